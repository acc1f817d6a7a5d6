// Python bindings of the native CPU kernels (xmc_toolkit/native.py builds and loads them).
#include <torch/extension.h>

namespace xmc {
void row_adam_(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor rows,
               at::Tensor values, double lr_step, double beta1, double beta2, double eps,
               double floor);
void bag_rows_(at::Tensor out, at::Tensor queries, at::Tensor perm, at::Tensor gs,
               at::Tensor starts, int64_t per_query);
at::Tensor cdf_draw(at::Tensor weights, at::Tensor uniforms);
std::tuple<at::Tensor, at::Tensor, at::Tensor> project_rows(
    at::Tensor x, at::Tensor r, at::Tensor cell, int64_t num_cells, at::Tensor since);
at::Tensor row_argmin(at::Tensor dist);
std::tuple<at::Tensor, at::Tensor> merge_cells(at::Tensor items, at::Tensor cell,
                                               at::Tensor moved, int64_t num_cells);
}  // namespace xmc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("row_adam_", &xmc::row_adam_, "fused Adam update of distinct rows (in place)");
  mod.def("bag_rows_", &xmc::bag_rows_, "per-row weighted sums of queries (in place)");
  mod.def("cdf_draw", &xmc::cdf_draw, "inverse-CDF draws with replacement from weight rows");
  mod.def("project_rows", &xmc::project_rows, "row fingerprints, per-cell row sums, changed rows");
  mod.def("row_argmin", &xmc::row_argmin, "first index of each row's minimum");
  mod.def("merge_cells", &xmc::merge_cells, "CSR by cell after some labels moved, one pass");
}
