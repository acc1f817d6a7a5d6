// Passes of the MIDX index refresh (xmc_toolkit/sampling/midx.py, xmc_toolkit/codebook.py):
//
//   project_rows(x [L, d], r [d], cell [L], C, since [L]) -> (fp [L], sums [C, d], changed [n])
//     fp[i] = x[i] . r (the change fingerprint); when C > 0, sums[c] = sum of the rows x[i]
//     with cell[i] == c; when `since` (the previous fingerprints) is given, the ascending ids of
//     the rows whose fingerprint differs from it -- one sequential read of the table instead of
//     a matrix-vector product and a sparse matrix product (each a full read of the [L, d]
//     table) and a comparison. The dot product of a row is summed in a fixed order (8 partial sums), so a
//     row's fingerprint does not depend on L or on the threads; the cell sums do (float
//     rounding), like any parallel sum.
//   row_argmin(dist [N, K]) -> [N] int64
//     the first index of each row's minimum, torch.min(dim=1).indices (NaN: the first NaN):
//     the nearest codeword of each row of a distance block. With AVX2 eight entries a step in
//     vector registers (torch's index-tracking reduction is ten times slower than its plain
//     minimum at K = 64); elsewhere a scalar loop.
//   merge_cells(items [L], cell [L], moved [R], C) -> (indptr [C + 1], out [L])
//     the CSR of the labels by (new cell, label) after the `moved` labels (sorted by that key)
//     changed cell: the unmoved labels keep their order, the moved ones are merged in -- one
//     sequential pass (xmc_toolkit/sampling/midx.py, merge_cells, is the eager version).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
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

namespace {

// the first index of the minimum, or of the first NaN (torch's rule: NaN is the minimum)
int64_t argmin_scalar(const float* row, int64_t k) {
  int64_t idx = 0;
  float m = row[0];
  if (m != m) return 0;
  for (int64_t j = 1; j < k; ++j) {
    const float v = row[j];
    if (v != v) return j;
    if (v < m) m = v, idx = j;
  }
  return idx;
}

#if defined(__AVX2__)
int64_t argmin_avx2(const float* row, int64_t k) {
  // lane l: the minimum of entries j = l (mod 8) seen so far and its first index; an unordered
  // compare flags NaN rows, which go to the scalar rule
  __m256 best = _mm256_loadu_ps(row);
  __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i cur = at;
  const __m256i eight = _mm256_set1_epi32(8);
  __m256 nan = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
  int64_t j = 8;
  for (; j + 8 <= k; j += 8) {
    const __m256 v = _mm256_loadu_ps(row + j);
    cur = _mm256_add_epi32(cur, eight);
    const __m256 lt = _mm256_cmp_ps(v, best, _CMP_LT_OQ);
    best = _mm256_blendv_ps(best, v, lt);
    at = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(cur), lt));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) return argmin_scalar(row, k);
  alignas(32) float bv[8];
  alignas(32) int32_t bi[8];
  _mm256_store_ps(bv, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bi), at);
  float m = bv[0];
  int64_t idx = bi[0];
  for (int l = 1; l < 8; ++l) {
    if (bv[l] < m || (bv[l] == m && bi[l] < idx)) m = bv[l], idx = bi[l];
  }
  for (; j < k; ++j) {  // the tail, after every earlier index
    const float v = row[j];
    if (v != v) return argmin_scalar(row, k);
    if (v < m) m = v, idx = j;
  }
  return idx;
}
#endif

}  // namespace

at::Tensor row_argmin(at::Tensor dist) {
  TORCH_CHECK(dist.dim() == 2 && dist.is_contiguous() && dist.dtype() == at::kFloat,
              "dist must be a contiguous float32 [N, K] tensor");
  const int64_t n = dist.size(0), k = dist.size(1);
  TORCH_CHECK(k > 0, "dist must have at least one column");
  at::Tensor out = at::empty({n}, dist.options().dtype(at::kLong));
  const float* D = dist.data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
#if defined(__AVX2__)
      O[i] = k >= 8 ? argmin_avx2(D + i * k, k) : argmin_scalar(D + i * k, k);
#else
      O[i] = argmin_scalar(D + i * k, k);
#endif
    }
  });
  return out;
}

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
