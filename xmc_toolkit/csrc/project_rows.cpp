// The table pass of an incremental MIDX refresh (xmc_toolkit/sampling/midx.py, _table_pass):
//
//   project_rows(x [L, d], r [d], cell [L], C, since [L]) -> (fp [L], sums [C, d], changed [n])
//     fp[i] = x[i] . r (the change fingerprint); when C > 0, sums[c] = sum of the rows x[i]
//     with cell[i] == c; when `since` (the previous fingerprints) is given, the ascending ids of
//     the rows whose fingerprint differs from it -- one sequential read of the table instead of
//     a matrix-vector product and a sparse matrix product (each a full read of the [L, d]
//     table) and a comparison. The dot product of a row is summed in a fixed order (8 partial
//     sums), so a row's fingerprint does not depend on L or on the threads; the cell sums do
//     (float rounding), like any parallel sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace xmc {

namespace {

inline float dot_fixed_order(const float* a, const float* b, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
#pragma omp simd
    for (int l = 0; l < 8; ++l) acc[l] += a[j + l] * b[j + l];
  }
  for (int64_t t = 0; j < d; ++j, ++t) acc[t] += a[j] * b[j];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> project_rows(
    at::Tensor x, at::Tensor r, at::Tensor cell, int64_t num_cells, at::Tensor since) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.dtype() == at::kFloat,
              "x must be a contiguous float32 [L, d] tensor");
  TORCH_CHECK(r.dim() == 1 && r.is_contiguous() && r.dtype() == at::kFloat &&
                  r.size(0) == x.size(1), "r must be a contiguous float32 [d] tensor");
  TORCH_CHECK(num_cells >= 0, "num_cells must be >= 0");
  const int64_t L = x.size(0), d = x.size(1);
  const int64_t* cl = nullptr;
  if (num_cells > 0) {
    TORCH_CHECK(cell.dim() == 1 && cell.is_contiguous() && cell.dtype() == at::kLong &&
                    cell.size(0) == L, "cell must be a contiguous int64 [L] tensor");
    cl = cell.data_ptr<int64_t>();
    for (int64_t i = 0; i < L; ++i) {
      TORCH_CHECK(cl[i] >= 0 && cl[i] < num_cells, "cell id ", cl[i], " of row ", i,
                  " outside [0, ", num_cells, ")");
    }
  }
  const bool detect = since.numel() > 0;
  const float* old = nullptr;
  if (detect) {
    TORCH_CHECK(since.dim() == 1 && since.is_contiguous() && since.dtype() == at::kFloat &&
                    since.size(0) == L, "since must be a contiguous float32 [L] tensor");
    old = since.data_ptr<float>();
  }
  at::Tensor fp = at::empty({L}, x.options());
  at::Tensor sums = at::zeros({num_cells, d}, x.options());
  const float* X = x.data_ptr<float>();
  const float* R = r.data_ptr<float>();
  float* F = fp.data_ptr<float>();
  float* S = sums.data_ptr<float>();
  // one block of rows per thread; block 0 adds into `sums`, the others into their own buffers;
  // each block lists its changed rows (ascending)
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), L / 65536));
  std::vector<float> part(num_cells > 0 ? (blocks - 1) * num_cells * d : 0, 0.0f);
  std::vector<std::vector<int64_t>> ids(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      float* acc = blk == 0 ? S : part.data() + (blk - 1) * num_cells * d;
      const int64_t lo = L * blk / blocks, hi = L * (blk + 1) / blocks;
      std::vector<int64_t>& my_ids = ids[blk];
      for (int64_t i = lo; i < hi; ++i) {
        const float* xi = X + i * d;
        const float f = dot_fixed_order(xi, R, d);
        F[i] = f;
        if (detect && f != old[i]) my_ids.push_back(i);  // NaN != NaN: a NaN row changed
        if (cl != nullptr) {
          if (i + 8 < hi) {  // the cell row of a later table row: its L2 miss overlaps this one
            const char* ahead = reinterpret_cast<const char*>(acc + cl[i + 8] * d);
            for (int64_t b = 0; b < d * 4; b += 64) __builtin_prefetch(ahead + b, 1);
          }
          float* s = acc + cl[i] * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) s[j] += xi[j];
        }
      }
    }
  });
  for (int64_t blk = 1; blk < blocks && num_cells > 0; ++blk) {
    const float* p = part.data() + (blk - 1) * num_cells * d;
    for (int64_t j = 0; j < num_cells * d; ++j) S[j] += p[j];
  }
  int64_t n = 0;
  for (const auto& v : ids) n += static_cast<int64_t>(v.size());
  at::Tensor changed = at::empty({n}, x.options().dtype(at::kLong));
  int64_t* C = changed.data_ptr<int64_t>();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    std::copy(ids[blk].begin(), ids[blk].end(), C);
    C += ids[blk].size();
  }
  return {fp, sums, changed};
}

}  // namespace xmc
