// CUDA kernels of kd2::pgm_select (ATen-facing wrapper: pgm_select.cpp). Simple and correct:
// shared-memory row reductions for the densities and the scores, a single-block argmax, and an
// AXPY-style rank-1 update. The picked position stays on the device: no host sync per round.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_kernels.h"

namespace kd2 {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65536)));
}

inline unsigned int rows_grid(int64_t rows) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(rows, 65536)));
}

// Tree reduction of buf[0 .. kThreads) into buf[0]; all threads of the block must call it.
__device__ void block_sum(double* buf) {
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      buf[threadIdx.x] += buf[threadIdx.x + s];
    }
    __syncthreads();
  }
}

// One block per row: out[i] = sum_j exp(-((1 - gram[i, j]) / bandwidth)^2), summed in double.
template <typename T>
__global__ void density_kernel(const T* gram, int64_t N, T bandwidth, T* out) {
  __shared__ double buf[kThreads];
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const T* g = gram + i * N;
    double acc = 0.0;
    for (int64_t j = threadIdx.x; j < N; j += kThreads) {
      const T d = (T(1) - g[j]) / bandwidth;
      acc += static_cast<double>(exp(-d * d));
    }
    buf[threadIdx.x] = acc;
    block_sum(buf);
    if (threadIdx.x == 0) {
      out[i] = static_cast<T>(buf[0]);
    }
    __syncthreads();
  }
}

// One block per candidate: scores[k] = sum_n (1+alpha)(a^2 + b^2) + 2 alpha a b, in double.
template <typename T>
__global__ void score_kernel(const T* pa, const T* pb, int64_t K, int64_t N, double alpha,
                             double* scores) {
  __shared__ double buf[kThreads];
  const double c_sq = 1.0 + alpha, c_x = 2.0 * alpha;
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const T* a = pa + k * N;
    const T* b = pb + k * N;
    double acc = 0.0;
    for (int64_t n = threadIdx.x; n < N; n += kThreads) {
      const double x = static_cast<double>(a[n]), y = static_cast<double>(b[n]);
      acc += c_sq * (x * x + y * y) + c_x * x * y;
    }
    buf[threadIdx.x] = acc;
    block_sum(buf);
    if (threadIdx.x == 0) {
      scores[k] = buf[0];
    }
    __syncthreads();
  }
}

// Single block: best[0] = argmax_k scores[k] (ties -> lowest k; NaN never wins, all-NaN -> 0),
// picks[round] = cand[best[0]].
__global__ void argmax_kernel(const double* scores, int64_t K, const int64_t* cand,
                              int64_t* best, int64_t* picks, int64_t round) {
  __shared__ double vals[kThreads];
  __shared__ int64_t idxs[kThreads];
  double bv = 0.0;
  int64_t bi = -1;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const double v = scores[k];
    if (v == v && (bi < 0 || v > bv)) {  // increasing k: strict > keeps the lowest index
      bv = v;
      bi = k;
    }
  }
  vals[threadIdx.x] = bv;
  idxs[threadIdx.x] = bi;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const double ov = vals[threadIdx.x + s];
      const int64_t oi = idxs[threadIdx.x + s];
      const int64_t mi = idxs[threadIdx.x];
      if (oi >= 0 && (mi < 0 || ov > vals[threadIdx.x] || (ov == vals[threadIdx.x] && oi < mi))) {
        vals[threadIdx.x] = ov;
        idxs[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int64_t g = idxs[0] < 0 ? 0 : idxs[0];
    best[0] = g;
    picks[round] = cand[g];
  }
}

// Coefficients of the picked atom: w_a, w_b (N each), from row best[0] of pa, pb.
template <typename T>
__global__ void weights_kernel(const T* pa, const T* pb, const int64_t* best, int64_t N,
                               double alpha, T* wa, T* wb) {
  const int64_t g = best[0];
  const double denom = 1.0 + 2.0 * alpha;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const double x = static_cast<double>(pa[g * N + n]), y = static_cast<double>(pb[g * N + n]);
    wa[n] = static_cast<T>(((1.0 + alpha) * x + alpha * y) / denom);
    wb[n] = static_cast<T>((alpha * x + (1.0 + alpha) * y) / denom);
  }
}

// P <- P - G[cand, cand[best]] w^T in both spaces (one thread per element of the K x N matrices).
template <typename T>
__global__ void update_kernel(T* pa, T* pb, const T* ga, const T* gb, const int64_t* cand,
                              const int64_t* best, const T* wa, const T* wb, int64_t K,
                              int64_t N) {
  const int64_t j = cand[best[0]];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < K * N;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t k = i / N, n = i % N;
    const int64_t row = cand[k];
    pa[i] -= ga[row * N + j] * wa[n];
    pb[i] -= gb[row * N + j] * wb[n];
  }
}

}  // namespace

template <typename T>
cudaError_t pgm_density(const T* gram, int64_t N, double bandwidth, T* out, cudaStream_t stream) {
  if (N == 0) {
    return cudaSuccess;
  }
  density_kernel<T><<<rows_grid(N), kThreads, 0, stream>>>(
      gram, N, static_cast<T>(bandwidth), out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t pgm_pursuit(
    T* pa,
    T* pb,
    const T* ga,
    const T* gb,
    const int64_t* cand,
    int64_t K,
    int64_t N,
    int64_t rounds,
    double alpha,
    double* scores_ws,
    T* wa_ws,
    T* wb_ws,
    int64_t* best_ws,
    int64_t* picks,
    cudaStream_t stream) {
  if (K == 0 || N == 0) {
    return cudaSuccess;
  }
  for (int64_t r = 0; r < rounds; ++r) {
    score_kernel<T><<<rows_grid(K), kThreads, 0, stream>>>(pa, pb, K, N, alpha, scores_ws);
    argmax_kernel<<<1, kThreads, 0, stream>>>(scores_ws, K, cand, best_ws, picks, r);
    if (r + 1 < rounds) {
      weights_kernel<T><<<grid_for(N), kThreads, 0, stream>>>(
          pa, pb, best_ws, N, alpha, wa_ws, wb_ws);
      update_kernel<T><<<grid_for(K * N), kThreads, 0, stream>>>(
          pa, pb, ga, gb, cand, best_ws, wa_ws, wb_ws, K, N);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      return err;
    }
  }
  return cudaSuccess;
}

template cudaError_t pgm_density<float>(const float*, int64_t, double, float*, cudaStream_t);
template cudaError_t pgm_density<double>(const double*, int64_t, double, double*, cudaStream_t);
template cudaError_t pgm_pursuit<float>(float*, float*, const float*, const float*,
                                        const int64_t*, int64_t, int64_t, int64_t, double,
                                        double*, float*, float*, int64_t*, int64_t*,
                                        cudaStream_t);
template cudaError_t pgm_pursuit<double>(double*, double*, const double*, const double*,
                                         const int64_t*, int64_t, int64_t, int64_t, double,
                                         double*, double*, double*, int64_t*, int64_t*,
                                         cudaStream_t);

}  // namespace cuda
}  // namespace kd2
