// Launchers of kd2's CUDA kernels. They take raw device pointers, so the .cu files need no ATen
// headers (which keeps nvcc fast); the ATen-facing wrappers live in the .cpp files. Every
// launcher enqueues its kernels on `stream` and returns cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kd2 {
namespace cuda {

// box_mean_pool forward. x: (N, C, H, W) contiguous; boxes: (M, 4) double; batch_index: (M,)
// already checked to lie in [0, N); out: (M, C). sat_ws: workspace of
// chunk_planes * (H + 1) * (W + 1) doubles; the N * C summed-area tables are built
// chunk_planes at a time.
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
    cudaStream_t stream);

// box_mean_pool backward. grad: (M, C); grad_x: (N, C, H, W) written in full;
// diff_ws: workspace of chunk_planes * (H + 1) * (W + 1) doubles (2-D difference arrays).
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
    cudaStream_t stream);

// out[i] = sum_j exp(-((1 - gram[i, j]) / bandwidth)^2) for an (N, N) Gram matrix.
template <typename T>
cudaError_t pgm_density(const T* gram, int64_t N, double bandwidth, T* out, cudaStream_t stream);

// `rounds` rounds of joint matching pursuit on the (K, N) inner-product matrices pa, pb (updated
// in place). ga, gb: (N, N) Gram matrices; cand: (K,) candidate rows. picks: (rounds,) receives
// the picked rows. Workspaces: scores_ws (K doubles), wa_ws / wb_ws (N each), best_ws (1).
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
    cudaStream_t stream);

}  // namespace cuda
}  // namespace kd2
