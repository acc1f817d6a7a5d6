// The nearest codeword of each row of a k-means distance block (xmc_toolkit/codebook.py,
// assign_nearest):
//
//   row_argmin(dist [N, K]) -> [N] int64
//     the first index of each row's minimum, torch.min(dim=1).indices (NaN: the first NaN).
//     With AVX2 eight entries a step in vector registers (torch's index-tracking reduction is
//     ten times slower than its plain minimum at K = 64); elsewhere a scalar loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace xmc {

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

}  // namespace xmc
