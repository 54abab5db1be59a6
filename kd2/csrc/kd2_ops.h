// Declarations of kd2's operators (schemas and registration in ops.cpp). The Python wrappers in
// kd2/ops check arguments thoroughly; the checks here keep direct torch.ops.kd2 calls memory-safe.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace kd2 {

// ---- box_mean_pool -------------------------------------------------------------------------

at::Tensor box_mean_pool_cpu(
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& batch_index,
    double stride);

at::Tensor box_mean_pool_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& boxes,
    const at::Tensor& batch_index,
    double stride,
    int64_t batch_size,
    int64_t height,
    int64_t width);

#ifdef WITH_CUDA
at::Tensor box_mean_pool_cuda(
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& batch_index,
    double stride);

at::Tensor box_mean_pool_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& boxes,
    const at::Tensor& batch_index,
    double stride,
    int64_t batch_size,
    int64_t height,
    int64_t width);
#endif

// Checks shared by the CPU and CUDA box_mean_pool kernels (not the batch_index range, which each
// device checks its own way). `values` is the features (4-D) or the incoming gradient (2-D).
inline void check_box_args(
    const char* op,
    const at::Tensor& values,
    const at::Tensor& boxes,
    const at::Tensor& batch_index,
    double stride) {
  TORCH_CHECK(
      at::isFloatingType(values.scalar_type()), op, ": expected floating-point values, got ",
      values.scalar_type());
  TORCH_CHECK(
      boxes.dim() == 2 && boxes.size(1) == 4, op, ": boxes must be (M, 4), got ", boxes.sizes());
  TORCH_CHECK(
      at::isFloatingType(boxes.scalar_type()), op, ": boxes must be floating point, got ",
      boxes.scalar_type());
  TORCH_CHECK(
      batch_index.dim() == 1 && batch_index.size(0) == boxes.size(0), op,
      ": batch_index must be (M,) with M = ", boxes.size(0), ", got ", batch_index.sizes());
  TORCH_CHECK(
      batch_index.scalar_type() == at::kLong, op, ": batch_index must be int64, got ",
      batch_index.scalar_type());
  TORCH_CHECK(
      boxes.device() == values.device() && batch_index.device() == values.device(), op,
      ": all tensors must be on one device, got ", values.device(), ", ", boxes.device(), ", ",
      batch_index.device());
  TORCH_CHECK(stride > 0.0 && std::isfinite(stride), op, ": stride must be > 0, got ", stride);
}

// ---- pgm_select ----------------------------------------------------------------------------

at::Tensor pgm_select_cpu(
    const at::Tensor& feats_a,
    const at::Tensor& feats_b,
    int64_t num_prototypes,
    double alpha,
    double bandwidth,
    double quantile);

#ifdef WITH_CUDA
at::Tensor pgm_select_cuda(
    const at::Tensor& feats_a,
    const at::Tensor& feats_b,
    int64_t num_prototypes,
    double alpha,
    double bandwidth,
    double quantile);
#endif

void check_pgm_args(
    const at::Tensor& feats_a,
    const at::Tensor& feats_b,
    int64_t num_prototypes,
    double alpha,
    double bandwidth,
    double quantile);

// Device-independent part of pgm_select (ATen ops only): the L2-normalised rows, the two Gram
// matrices, the densities (through the device's `density` kernel), the candidate rows and the
// initial (K, N) inner products P = G[candidates, :].
struct PgmSetup {
  at::Tensor ga, gb;  // (N, N) cosine Gram matrices
  at::Tensor cand;  // (K,) int64 candidate rows, ascending
  at::Tensor pa, pb;  // (K, N) contiguous
};

using DensityFn = void (*)(const at::Tensor& gram, double bandwidth, at::Tensor& out);

PgmSetup pgm_prepare(
    const at::Tensor& feats_a,
    const at::Tensor& feats_b,
    double bandwidth,
    double quantile,
    DensityFn density);

int64_t cuda_version();

}  // namespace kd2
