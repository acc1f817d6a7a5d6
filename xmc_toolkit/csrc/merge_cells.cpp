// The CSR of the labels by cell after an incremental MIDX refresh (xmc_toolkit/sampling/midx.py,
// merge_cells, whose eager path computes the same):
//
//   merge_cells(items [L], cell [L], moved [R], C) -> (indptr [C + 1], out [L])
//     the labels sorted by (new cell, label) after the `moved` labels (sorted by that key)
//     changed cell: the unmoved labels keep their order, the moved ones are merged in -- one
//     sequential pass.
#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace xmc {

std::tuple<at::Tensor, at::Tensor> merge_cells(at::Tensor items, at::Tensor cell,
                                               at::Tensor moved, int64_t num_cells) {
  TORCH_CHECK(items.dim() == 1 && items.is_contiguous() && items.dtype() == at::kLong,
              "items must be a contiguous int64 [L] tensor");
  const int64_t L = items.size(0);
  TORCH_CHECK(cell.dim() == 1 && cell.is_contiguous() && cell.dtype() == at::kLong &&
                  cell.size(0) == L, "cell must be a contiguous int64 [L] tensor");
  TORCH_CHECK(moved.dim() == 1 && moved.is_contiguous() && moved.dtype() == at::kLong &&
                  moved.size(0) <= L, "moved must be a contiguous int64 [R] tensor, R <= L");
  TORCH_CHECK(num_cells > 0, "num_cells must be positive");
  const int64_t R = moved.size(0);
  const int64_t* it = items.data_ptr<int64_t>();
  const int64_t* cl = cell.data_ptr<int64_t>();
  const int64_t* mv = moved.data_ptr<int64_t>();
  at::Tensor indptr = at::zeros({num_cells + 1}, items.options());
  at::Tensor out = at::empty({L}, items.options());
  int64_t* ip = indptr.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < L; ++i) {
    TORCH_CHECK(cl[i] >= 0 && cl[i] < num_cells, "cell id ", cl[i], " of label ", i,
                " outside [0, ", num_cells, ")");
    ++ip[cl[i] + 1];
  }
  for (int64_t c = 0; c < num_cells; ++c) ip[c + 1] += ip[c];
  std::vector<uint8_t> is_moved(L, 0);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(mv[r] >= 0 && mv[r] < L, "moved label ", mv[r], " outside [0, ", L, ")");
    TORCH_CHECK(!is_moved[mv[r]], "moved label ", mv[r], " listed twice");
    TORCH_CHECK(r == 0 || cl[mv[r - 1]] < cl[mv[r]] ||
                    (cl[mv[r - 1]] == cl[mv[r]] && mv[r - 1] < mv[r]),
                "moved labels must be sorted by (new cell, label)");
    is_moved[mv[r]] = 1;
  }
  // both sequences ascend in (cell, label): the kept labels in the previous order (their cell
  // did not change), the moved ones as given
  int64_t a = 0, b = 0, n = 0;
  while (true) {
    while (a < L && is_moved[it[a]]) ++a;
    if (a >= L || b >= R) break;
    const int64_t ka = it[a], kb = mv[b];
    const bool take_a = cl[ka] < cl[kb] || (cl[ka] == cl[kb] && ka < kb);
    o[n++] = take_a ? ka : kb;
    a += take_a;
    b += !take_a;
  }
  for (; a < L; ++a) {
    if (!is_moved[it[a]]) o[n++] = it[a];
  }
  for (; b < R; ++b) o[n++] = mv[b];
  TORCH_CHECK(n == L, "items must be a permutation of [0, L) sorted by the previous cells");
  return {indptr, out};
}

}  // namespace xmc
