// CUDA kernels of kd2::box_mean_pool (ATen-facing wrappers: box_mean_pool.cpp).
//
// Forward, per chunk of (image, channel) planes: summed-area tables in double (a row-prefix
// kernel, then a column-prefix kernel), then one thread per (box, channel) reads four corners.
// Backward, per chunk: one thread per (box, channel) adds grad / count at four corners of the
// plane's 2-D difference array (atomicAdd on double), then row- and column-prefix kernels write
// the gradient of the features.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "box_cells.h"
#include "cuda_kernels.h"

namespace kd2 {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65536)));
}

#define KD2_GRID_STRIDE_LOOP(i, n)                                                        \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// sat[p, h + 1, w + 1] = sum_{w' <= w} x[p, h, w'] and sat[p, h + 1, 0] = 0, for h < H.
template <typename T>
__global__ void sat_rows_kernel(const T* x, double* sat, int64_t planes, int64_t H, int64_t W) {
  const int64_t W1 = W + 1;
  KD2_GRID_STRIDE_LOOP(i, planes * H) {
    const int64_t p = i / H, h = i % H;
    const T* xr = x + (p * H + h) * W;
    double* sr = sat + p * (H + 1) * W1 + (h + 1) * W1;
    double run = 0.0;
    sr[0] = 0.0;
    for (int64_t w = 0; w < W; ++w) {
      run += static_cast<double>(xr[w]);
      sr[w + 1] = run;
    }
  }
}

// Column prefix sums over rows 1..H; row 0 is set to zero.
__global__ void sat_cols_kernel(double* sat, int64_t planes, int64_t H, int64_t W) {
  const int64_t W1 = W + 1;
  KD2_GRID_STRIDE_LOOP(i, planes * W1) {
    const int64_t p = i / W1, w = i % W1;
    double* s = sat + p * (H + 1) * W1 + w;
    s[0] = 0.0;
    double run = 0.0;
    for (int64_t h = 1; h <= H; ++h) {
      run += s[h * W1];
      s[h * W1] = run;
    }
  }
}

// out[m, c] for the (box, channel) pairs whose plane n*C + c lies in [p0, p0 + planes).
template <typename T>
__global__ void box_sum_kernel(
    const double* sat,
    const double* boxes,
    const int64_t* batch_index,
    T* out,
    int64_t p0,
    int64_t planes,
    int64_t N,
    int64_t C,
    int64_t H,
    int64_t W,
    int64_t M,
    double stride) {
  const int64_t W1 = W + 1;
  KD2_GRID_STRIDE_LOOP(i, M * C) {
    const int64_t m = i / C, c = i % C;
    const int64_t n = batch_index[m];
    const int64_t p = n * C + c - p0;
    if (n < 0 || n >= N || p < 0 || p >= planes) {
      continue;
    }
    const BoxCells bc = box_cells(boxes + 4 * m, stride, H, W);
    const double* s = sat + p * (H + 1) * W1;
    const double sum = s[(bc.r1 + 1) * W1 + bc.c1 + 1] - s[bc.r0 * W1 + bc.c1 + 1] -
        s[(bc.r1 + 1) * W1 + bc.c0] + s[bc.r0 * W1 + bc.c0];
    out[i] = static_cast<T>(sum / bc.count());
  }
}

template <typename T>
__global__ void box_scatter_kernel(
    const T* grad,
    const double* boxes,
    const int64_t* batch_index,
    double* diff,
    int64_t p0,
    int64_t planes,
    int64_t N,
    int64_t C,
    int64_t H,
    int64_t W,
    int64_t M,
    double stride) {
  const int64_t W1 = W + 1;
  KD2_GRID_STRIDE_LOOP(i, M * C) {
    const int64_t m = i / C, c = i % C;
    const int64_t n = batch_index[m];
    const int64_t p = n * C + c - p0;
    if (n < 0 || n >= N || p < 0 || p >= planes) {
      continue;
    }
    const BoxCells bc = box_cells(boxes + 4 * m, stride, H, W);
    const double v = static_cast<double>(grad[i]) / bc.count();
    double* d = diff + p * (H + 1) * W1;
    atomicAdd(d + bc.r0 * W1 + bc.c0, v);
    atomicAdd(d + bc.r0 * W1 + bc.c1 + 1, -v);
    atomicAdd(d + (bc.r1 + 1) * W1 + bc.c0, -v);
    atomicAdd(d + (bc.r1 + 1) * W1 + bc.c1 + 1, v);
  }
}

// In-place prefix sums along each of the first H rows (first W columns) of every plane.
__global__ void diff_rows_kernel(double* diff, int64_t planes, int64_t H, int64_t W) {
  const int64_t W1 = W + 1;
  KD2_GRID_STRIDE_LOOP(i, planes * H) {
    const int64_t p = i / H, h = i % H;
    double* d = diff + p * (H + 1) * W1 + h * W1;
    double run = 0.0;
    for (int64_t w = 0; w < W; ++w) {
      run += d[w];
      d[w] = run;
    }
  }
}

// Prefix sums down each column, written to the (planes, H, W) gradient.
template <typename T>
__global__ void diff_cols_kernel(const double* diff, T* out, int64_t planes, int64_t H, int64_t W) {
  const int64_t W1 = W + 1;
  KD2_GRID_STRIDE_LOOP(i, planes * W) {
    const int64_t p = i / W, w = i % W;
    const double* d = diff + p * (H + 1) * W1 + w;
    T* o = out + p * H * W + w;
    double run = 0.0;
    for (int64_t h = 0; h < H; ++h) {
      run += d[h * W1];
      o[h * W] = static_cast<T>(run);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t box_mean_pool_forward(
    const T* x,
    const double* boxes,
    const int64_t* batch_index,
    T* out,
    double* sat_ws,
    int64_t chunk_planes,
    int64_t N,
    int64_t C,
    int64_t H,
    int64_t W,
    int64_t M,
    double stride,
    cudaStream_t stream) {
  const int64_t total = N * C;
  for (int64_t p0 = 0; p0 < total; p0 += chunk_planes) {
    const int64_t planes = std::min(chunk_planes, total - p0);
    sat_rows_kernel<T><<<grid_for(planes * H), kThreads, 0, stream>>>(
        x + p0 * H * W, sat_ws, planes, H, W);
    sat_cols_kernel<<<grid_for(planes * (W + 1)), kThreads, 0, stream>>>(sat_ws, planes, H, W);
    box_sum_kernel<T><<<grid_for(M * C), kThreads, 0, stream>>>(
        sat_ws, boxes, batch_index, out, p0, planes, N, C, H, W, M, stride);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      return err;
    }
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t box_mean_pool_backward(
    const T* grad,
    const double* boxes,
    const int64_t* batch_index,
    T* grad_x,
    double* diff_ws,
    int64_t chunk_planes,
    int64_t N,
    int64_t C,
    int64_t H,
    int64_t W,
    int64_t M,
    double stride,
    cudaStream_t stream) {
  const int64_t total = N * C;
  for (int64_t p0 = 0; p0 < total; p0 += chunk_planes) {
    const int64_t planes = std::min(chunk_planes, total - p0);
    cudaError_t err = cudaMemsetAsync(
        diff_ws, 0, static_cast<size_t>(planes * (H + 1) * (W + 1)) * sizeof(double), stream);
    if (err != cudaSuccess) {
      return err;
    }
    box_scatter_kernel<T><<<grid_for(M * C), kThreads, 0, stream>>>(
        grad, boxes, batch_index, diff_ws, p0, planes, N, C, H, W, M, stride);
    diff_rows_kernel<<<grid_for(planes * H), kThreads, 0, stream>>>(diff_ws, planes, H, W);
    diff_cols_kernel<T><<<grid_for(planes * W), kThreads, 0, stream>>>(
        diff_ws, grad_x + p0 * H * W, planes, H, W);
    err = cudaGetLastError();
    if (err != cudaSuccess) {
      return err;
    }
  }
  return cudaSuccess;
}

#define KD2_INSTANTIATE(T)                                                                     \
  template cudaError_t box_mean_pool_forward<T>(                                               \
      const T*, const double*, const int64_t*, T*, double*, int64_t, int64_t, int64_t, int64_t, \
      int64_t, int64_t, double, cudaStream_t);                                                 \
  template cudaError_t box_mean_pool_backward<T>(                                              \
      const T*, const double*, const int64_t*, T*, double*, int64_t, int64_t, int64_t, int64_t, \
      int64_t, int64_t, double, cudaStream_t);

KD2_INSTANTIATE(float)
KD2_INSTANTIATE(double)
#undef KD2_INSTANTIATE

}  // namespace cuda
}  // namespace kd2
