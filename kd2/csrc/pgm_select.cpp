// kd2::pgm_select — the prototype generation module (PGM) of "Distilling Object Detectors with
// Global Knowledge" (ECCV 2022) in Gram form; see kd2/ops/pgm.py for the algorithm.
//
// With unit-norm atoms, the joint matching-pursuit error of candidate k is
//   E_k = |R_a|^2 + |R_b|^2 - S_k / (1 + 2 alpha),
//   S_k = sum_n (1 + alpha) (P_a[k, n]^2 + P_b[k, n]^2) + 2 alpha P_a[k, n] P_b[k, n],
// where P = (candidate atoms) . (residuals) is K x N, so argmin E = argmax S and the residual
// update R <- R - x w^T becomes the rank-1 update P <- P - G[cand, picked] w^T. Nothing of size
// K x D x N is formed: the cost is two N x N x D matmuls plus O(rounds * K * N).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kd2_ops.h"

#ifdef WITH_CUDA
// c10 headers only (ATen/cuda/CUDAContext.h would also need the cuBLAS / cuSPARSE headers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_kernels.h"
#endif

namespace kd2 {

void check_pgm_args(
    const at::Tensor& feats_a,
    const at::Tensor& feats_b,
    int64_t num_prototypes,
    double alpha,
    double bandwidth,
    double quantile) {
  const char* op = "kd2::pgm_select";
  TORCH_CHECK(
      feats_a.dim() == 2 && feats_b.dim() == 2, op, ": feats_a and feats_b must be (N, D), got ",
      feats_a.sizes(), " and ", feats_b.sizes());
  TORCH_CHECK(
      feats_a.size(0) == feats_b.size(0), op, ": feats_a and feats_b must have the same rows, got ",
      feats_a.size(0), " and ", feats_b.size(0));
  TORCH_CHECK(
      at::isFloatingType(feats_a.scalar_type()) && at::isFloatingType(feats_b.scalar_type()), op,
      ": features must be floating point, got ", feats_a.scalar_type(), " and ",
      feats_b.scalar_type());
  TORCH_CHECK(
      feats_a.device() == feats_b.device(), op, ": feats_a and feats_b are on ", feats_a.device(),
      " and ", feats_b.device());
  TORCH_CHECK(num_prototypes >= 0, op, ": num_prototypes must be >= 0, got ", num_prototypes);
  TORCH_CHECK(alpha >= 0.0 && std::isfinite(alpha), op, ": alpha must be >= 0, got ", alpha);
  TORCH_CHECK(
      bandwidth > 0.0 && std::isfinite(bandwidth), op, ": bandwidth must be > 0, got ", bandwidth);
  TORCH_CHECK(
      quantile >= 0.0 && quantile < 1.0, op, ": quantile must be in [0, 1), got ", quantile);
}

PgmSetup pgm_prepare(
    const at::Tensor& feats_a,
    const at::Tensor& feats_b,
    double bandwidth,
    double quantile,
    DensityFn density) {
  // fp32 at least; fp64 stays fp64 (both spaces in the promoted type).
  const at::ScalarType promoted = at::promote_types(feats_a.scalar_type(), feats_b.scalar_type());
  const at::ScalarType dt = promoted == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = feats_a.size(0);
  auto normalize = [&](const at::Tensor& x) {
    const at::Tensor xd = x.to(dt);
    const at::Tensor norm = at::linalg_vector_norm(xd, 2, at::IntArrayRef{1}, true, std::nullopt);
    return xd / norm.clamp_min(1e-12);
  };
  const at::Tensor xa = normalize(feats_a);
  const at::Tensor xb = normalize(feats_b);
  PgmSetup s;
  s.ga = at::mm(xa, xa.t()).contiguous();
  s.gb = at::mm(xb, xb.t()).contiguous();
  at::Tensor rho_a = at::empty({N}, s.ga.options());
  at::Tensor rho_b = at::empty({N}, s.gb.options());
  density(s.ga, bandwidth, rho_a);
  density(s.gb, bandwidth, rho_b);
  // tau = the floor(quantile * N)-th smallest density (0-based); candidates are strictly above.
  const int64_t q = std::min<int64_t>(static_cast<int64_t>(std::floor(quantile * N)), N - 1);
  const at::Tensor tau_a = std::get<0>(at::sort(rho_a)).select(0, q);
  const at::Tensor tau_b = std::get<0>(at::sort(rho_b)).select(0, q);
  s.cand = at::nonzero(rho_a.gt(tau_a).logical_and_(rho_b.gt(tau_b))).squeeze(1);
  if (s.cand.numel() == 0) {
    s.cand = at::arange(N, s.ga.options().dtype(at::kLong));
  }
  s.pa = s.ga.index_select(0, s.cand).contiguous();
  s.pb = s.gb.index_select(0, s.cand).contiguous();
  return s;
}

namespace {

// ---- CPU kernels ---------------------------------------------------------------------------

template <typename scalar_t>
void density_rows(const scalar_t* gram, int64_t N, double bandwidth, scalar_t* out) {
  const scalar_t bw = static_cast<scalar_t>(bandwidth);
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t b,
                                                                                     int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const scalar_t* g = gram + i * N;
      double acc = 0.0;
      for (int64_t j = 0; j < N; ++j) {
        const scalar_t d = (scalar_t(1) - g[j]) / bw;
        acc += static_cast<double>(std::exp(-d * d));
      }
      out[i] = static_cast<scalar_t>(acc);
    }
  });
}

void density_cpu(const at::Tensor& gram, double bandwidth, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "pgm_density_cpu", [&] {
    density_rows<scalar_t>(
        gram.data_ptr<scalar_t>(), gram.size(0), bandwidth, out.data_ptr<scalar_t>());
  });
}

// argmax_k S_k (ties -> lowest k; NaN scores never win, all-NaN -> 0).
template <typename scalar_t>
int64_t best_candidate(const scalar_t* pa, const scalar_t* pb, int64_t K, int64_t N, double alpha,
                       std::vector<double>& scores) {
  const double c_sq = 1.0 + alpha, c_x = 2.0 * alpha;
  at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t b,
                                                                                     int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const scalar_t* a = pa + k * N;
      const scalar_t* bb = pb + k * N;
      double acc = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const double x = a[n], y = bb[n];
        acc += c_sq * (x * x + y * y) + c_x * x * y;
      }
      scores[k] = acc;
    }
  });
  int64_t best = 0;
  double best_v = -std::numeric_limits<double>::infinity();
  bool found = false;
  for (int64_t k = 0; k < K; ++k) {
    if (scores[k] > best_v || (!found && scores[k] == best_v)) {
      best = k;
      best_v = scores[k];
      found = true;
    }
  }
  return best;
}

// Coefficients of the picked atom, then P <- P - G[cand, picked] w^T in both spaces.
template <typename scalar_t>
void rank1_update(scalar_t* pa, scalar_t* pb, const scalar_t* ga, const scalar_t* gb,
                  const int64_t* cand, int64_t K, int64_t N, int64_t best, double alpha,
                  std::vector<scalar_t>& wa, std::vector<scalar_t>& wb) {
  const double denom = 1.0 + 2.0 * alpha;
  const scalar_t* a = pa + best * N;
  const scalar_t* b = pb + best * N;
  for (int64_t n = 0; n < N; ++n) {
    const double x = a[n], y = b[n];
    wa[n] = static_cast<scalar_t>(((1.0 + alpha) * x + alpha * y) / denom);
    wb[n] = static_cast<scalar_t>((alpha * x + (1.0 + alpha) * y) / denom);
  }
  const int64_t j = cand[best];
  at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t s,
                                                                                     int64_t e) {
    for (int64_t k = s; k < e; ++k) {
      const scalar_t ca = ga[cand[k] * N + j];
      const scalar_t cb = gb[cand[k] * N + j];
      scalar_t* ra = pa + k * N;
      scalar_t* rb = pb + k * N;
      for (int64_t n = 0; n < N; ++n) {
        ra[n] -= ca * wa[n];
        rb[n] -= cb * wb[n];
      }
    }
  });
}

}  // namespace

at::Tensor pgm_select_cpu(
    const at::Tensor& feats_a,
    const at::Tensor& feats_b,
    int64_t num_prototypes,
    double alpha,
    double bandwidth,
    double quantile) {
  check_pgm_args(feats_a, feats_b, num_prototypes, alpha, bandwidth, quantile);
  const int64_t N = feats_a.size(0);
  at::Tensor picks = at::empty({N == 0 ? 0 : num_prototypes}, feats_a.options().dtype(at::kLong));
  if (picks.numel() == 0) {
    return picks;
  }
  PgmSetup s = pgm_prepare(feats_a, feats_b, bandwidth, quantile, &density_cpu);
  const int64_t K = s.cand.size(0);
  int64_t* out = picks.data_ptr<int64_t>();
  const int64_t* cand = s.cand.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(s.pa.scalar_type(), "pgm_select_cpu", [&] {
    std::vector<double> scores(K);
    std::vector<scalar_t> wa(N), wb(N);
    scalar_t* pa = s.pa.data_ptr<scalar_t>();
    scalar_t* pb = s.pb.data_ptr<scalar_t>();
    for (int64_t r = 0; r < num_prototypes; ++r) {
      const int64_t best = best_candidate(pa, pb, K, N, alpha, scores);
      out[r] = cand[best];
      if (r + 1 < num_prototypes) {
        rank1_update(pa, pb, s.ga.data_ptr<scalar_t>(), s.gb.data_ptr<scalar_t>(), cand, K, N,
                     best, alpha, wa, wb);
      }
    }
  });
  return picks;
}

#ifdef WITH_CUDA

namespace {

void density_cuda(const at::Tensor& gram, double bandwidth, at::Tensor& out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (gram.scalar_type() == at::kDouble) {
    err = cuda::pgm_density<double>(
        gram.data_ptr<double>(), gram.size(0), bandwidth, out.data_ptr<double>(), stream);
  } else {
    err = cuda::pgm_density<float>(
        gram.data_ptr<float>(), gram.size(0), bandwidth, out.data_ptr<float>(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "kd2::pgm_select: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

at::Tensor pgm_select_cuda(
    const at::Tensor& feats_a,
    const at::Tensor& feats_b,
    int64_t num_prototypes,
    double alpha,
    double bandwidth,
    double quantile) {
  check_pgm_args(feats_a, feats_b, num_prototypes, alpha, bandwidth, quantile);
  const c10::cuda::CUDAGuard guard(feats_a.device());
  const int64_t N = feats_a.size(0);
  at::Tensor picks = at::empty({N == 0 ? 0 : num_prototypes}, feats_a.options().dtype(at::kLong));
  if (picks.numel() == 0) {
    return picks;
  }
  PgmSetup s = pgm_prepare(feats_a, feats_b, bandwidth, quantile, &density_cuda);
  const int64_t K = s.cand.size(0);
  const at::Tensor cand = s.cand.contiguous();
  at::Tensor scores = at::empty({K}, s.pa.options().dtype(at::kDouble));
  at::Tensor wa = at::empty({N}, s.pa.options());
  at::Tensor wb = at::empty({N}, s.pa.options());
  at::Tensor best = at::empty({1}, cand.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (s.pa.scalar_type() == at::kDouble) {
    err = cuda::pgm_pursuit<double>(
        s.pa.data_ptr<double>(), s.pb.data_ptr<double>(), s.ga.data_ptr<double>(),
        s.gb.data_ptr<double>(), cand.data_ptr<int64_t>(), K, N, num_prototypes, alpha,
        scores.data_ptr<double>(), wa.data_ptr<double>(), wb.data_ptr<double>(),
        best.data_ptr<int64_t>(), picks.data_ptr<int64_t>(), stream);
  } else {
    err = cuda::pgm_pursuit<float>(
        s.pa.data_ptr<float>(), s.pb.data_ptr<float>(), s.ga.data_ptr<float>(),
        s.gb.data_ptr<float>(), cand.data_ptr<int64_t>(), K, N, num_prototypes, alpha,
        scores.data_ptr<double>(), wa.data_ptr<float>(), wb.data_ptr<float>(),
        best.data_ptr<int64_t>(), picks.data_ptr<int64_t>(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "kd2::pgm_select: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return picks;
}

#endif  // WITH_CUDA

}  // namespace kd2
