// Weight gradient of per-query scores, one distinct label row at a time:
//   out[u] = sum over the sorted entries e of row u of gs[e] * queries[perm[e] / M]
// (xmc_toolkit/output_layer.py, _PerQueryScores.backward; the eager path is one embedding_bag
// over the queries, which allocates its [U, d] output afresh each step). Writes into the given
// `out` (a reused workspace), so no fresh [U, d] block is faulted in each step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace xmc {

void bag_rows_(at::Tensor out, at::Tensor queries, at::Tensor perm, at::Tensor gs,
               at::Tensor starts, int64_t per_query) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.dtype() == at::kFloat,
              "out must be a contiguous float32 [U, d] tensor");
  TORCH_CHECK(queries.dim() == 2 && queries.is_contiguous() && queries.dtype() == at::kFloat &&
                  queries.size(1) == out.size(1),
              "queries must be a contiguous float32 [B, d] tensor");
  TORCH_CHECK(perm.dim() == 1 && perm.is_contiguous() && perm.dtype() == at::kLong,
              "perm must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(gs.dim() == 1 && gs.is_contiguous() && gs.dtype() == at::kFloat &&
                  gs.size(0) == perm.size(0), "gs must be a contiguous float32 [N] tensor");
  TORCH_CHECK(starts.dim() == 1 && starts.is_contiguous() && starts.dtype() == at::kLong &&
                  starts.size(0) == out.size(0), "starts must be a contiguous int64 [U] tensor");
  TORCH_CHECK(per_query > 0, "per_query must be positive");
  const int64_t U = out.size(0), d = out.size(1), n = perm.size(0), B = queries.size(0);
  float* O = out.data_ptr<float>();
  const float* Q = queries.data_ptr<float>();
  const int64_t* Pm = perm.data_ptr<int64_t>();
  const float* W = gs.data_ptr<float>();
  const int64_t* S = starts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(Pm[i] >= 0 && Pm[i] / per_query < B, "entry ", Pm[i], " out of range");
  }
  for (int64_t u = 0; u < U; ++u) {
    const int64_t hi = u + 1 < U ? S[u + 1] : n;
    TORCH_CHECK(S[u] >= 0 && S[u] <= hi && hi <= n, "starts must increase within [0, N]");
  }
  at::parallel_for(0, U, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      float* o = O + u * d;
      const int64_t lo = S[u], hi = u + 1 < U ? S[u + 1] : n;
      for (int64_t j = 0; j < d; ++j) o[j] = 0.0f;
      for (int64_t e = lo; e < hi; ++e) {
        const float w = W[e];
        const float* q = Q + (Pm[e] / per_query) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) o[j] = std::fma(w, q[j], o[j]);
      }
    }
  });
}

}  // namespace xmc
