// Fused row-wise Adam over distinct rows: one pass per row (read p, m, v, g; write p, m, v).
//
// The same operations, in the same order and with the same fused multiply-adds, as the eager
// chunked update in xmc_toolkit/sparse_optim.py (_row_adam_chunked_): the moments come out bit
// for bit the same; the parameter differs only where torch's vectorised sqrt (not correctly
// rounded on AVX-512 builds) and this IEEE sqrt differ by one ulp of the denominator:
//   m = fma(1 - beta1, g, m * beta1)                 (m.mul_(beta1).add_(g, alpha=1 - beta1))
//   v = fma((1 - beta2) * g, g, v * beta2)           (v.mul_(beta2).addcmul_(g, g, 1 - beta2))
//   p = fma(m / (sqrt(max(v, floor)) + eps), -step_size, p)   (p.index_add_(.., alpha=-ss))
// Compiled with -ffp-contract=off so that only the explicit fma calls fuse.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace xmc {

void row_adam_(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq,
               at::Tensor rows, at::Tensor values, double lr_step, double beta1,
               double beta2, double eps, double floor) {
  TORCH_CHECK(param.is_cpu() && param.dtype() == at::kFloat && param.dim() == 2 &&
                  param.is_contiguous(), "param must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes() &&
                  exp_avg.is_contiguous() && exp_avg_sq.is_contiguous() &&
                  exp_avg.dtype() == at::kFloat && exp_avg_sq.dtype() == at::kFloat,
              "moments must be contiguous float32 tensors shaped like param");
  TORCH_CHECK(rows.dim() == 1 && rows.dtype() == at::kLong && rows.is_contiguous(),
              "rows must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(values.dim() == 2 && values.size(0) == rows.size(0) &&
                  values.size(1) == param.size(1) && values.is_contiguous() &&
                  values.dtype() == at::kFloat,
              "values must be a contiguous float32 [U, d] tensor");
  const int64_t n = rows.size(0), d = param.size(1), nrows = param.size(0);
  float* P = param.data_ptr<float>();
  float* M = exp_avg.data_ptr<float>();
  float* V = exp_avg_sq.data_ptr<float>();
  const float* G = values.data_ptr<float>();
  const int64_t* R = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(R[i] >= 0 && R[i] < nrows, "row ", R[i], " out of range [0, ", nrows, ")");
  }
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float c1 = static_cast<float>(1.0 - beta1), c2 = static_cast<float>(1.0 - beta2);
  const float neg_ss = static_cast<float>(-lr_step), e = static_cast<float>(eps);
  const float fl = static_cast<float>(floor);
  // rows are distinct: the row ranges of the threads never overlap
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = R[i];
      if (i + 2 < end) {  // the rows two ahead: their lines arrive while this one computes
        const int64_t rn = R[i + 2] * d;
        for (int64_t j = 0; j < d; j += 16) {
          __builtin_prefetch(P + rn + j, 1);
          __builtin_prefetch(M + rn + j, 1);
          __builtin_prefetch(V + rn + j, 1);
        }
      }
      float* pr = P + r * d;
      float* mr = M + r * d;
      float* vr = V + r * d;
      const float* gr = G + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const float g = gr[j];
        const float m = std::fma(c1, g, mr[j] * b1);
        const float v = std::fma(c2 * g, g, vr[j] * b2);
        mr[j] = m;
        vr[j] = v;
        const float den = std::sqrt(std::max(v, fl)) + e;
        pr[j] = std::fma(m / den, neg_ss, pr[j]);
      }
    }
  });
}

}  // namespace xmc
