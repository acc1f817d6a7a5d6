// Draws with replacement from each row of non-negative weights by inverse CDF:
//   cum = float64 inclusive cumulative sum of the row, t = min(u * total, nextafter(total, 0)),
//   draw = the first j with cum[j] > t
// the same numbers as the eager xmc_toolkit.sampling.midx._inverse_cdf_rows (torch.cumsum in
// float64 and torch.searchsorted(right=True)), one row per task and a binary search a draw.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace xmc {

at::Tensor cdf_draw(at::Tensor weights, at::Tensor uniforms) {
  TORCH_CHECK(weights.dim() == 2 && weights.is_contiguous() && weights.dtype() == at::kFloat,
              "weights must be a contiguous float32 [B, C] tensor");
  TORCH_CHECK(uniforms.dim() == 2 && uniforms.is_contiguous() &&
                  uniforms.dtype() == at::kDouble && uniforms.size(0) == weights.size(0),
              "uniforms must be a contiguous float64 [B, M] tensor");
  const int64_t B = weights.size(0), C = weights.size(1), M = uniforms.size(1);
  TORCH_CHECK(C > 0, "weights must have at least one column");
  at::Tensor out = at::empty({B, M}, weights.options().dtype(at::kLong));
  const float* Wt = weights.data_ptr<float>();
  const double* Ud = uniforms.data_ptr<double>();
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> cum(C);
    for (int64_t b = begin; b < end; ++b) {
      const float* w = Wt + b * C;
      double acc = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        acc += static_cast<double>(w[j]);
        cum[j] = acc;
      }
      const double total = cum[C - 1];
      const double below = std::nextafter(total, 0.0);
      const double* u = Ud + b * M;
      int64_t* o = O + b * M;
      // branch-free upper bound, kLanes searches in lockstep: the compares become conditional
      // moves and the lanes' loads overlap (a branching binary search mispredicts every level)
      constexpr int64_t kLanes = 8;
      const double* first = cum.data();
      int64_t i = 0;
      for (; i + kLanes <= M; i += kLanes) {
        double t[kLanes];
        const double* base[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) {
          t[l] = std::min(u[i + l] * total, below);
          base[l] = first;
        }
        for (int64_t len = C; len > 1;) {
          const int64_t half = len / 2;
          for (int64_t l = 0; l < kLanes; ++l) base[l] = base[l][half] <= t[l] ? base[l] + half : base[l];
          len -= half;
        }
        for (int64_t l = 0; l < kLanes; ++l) o[i + l] = (base[l] - first) + (*base[l] <= t[l]);
      }
      for (; i < M; ++i) {
        const double t = std::min(u[i] * total, below);
        o[i] = std::upper_bound(cum.begin(), cum.end(), t) - cum.begin();
      }
    }
  });
  return out;
}

}  // namespace xmc
