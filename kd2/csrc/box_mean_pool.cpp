// kd2::box_mean_pool — mean of the feature cells covered by each box, with integral images.
//
// Forward: for every (image n, channel c) plane the summed-area table S (H + 1, W + 1) is built
// once (in double precision), and the sum over a box's cell rectangle [r0, r1] x [c0, c1] is
//   S[r1 + 1, c1 + 1] - S[r0, c1 + 1] - S[r1 + 1, c0] + S[r0, c0],
// so the cost is O(N*C*H*W + M*C) whatever the box areas.
// Backward: each box adds grad / count at the four corners of a 2-D difference array per plane;
// its 2-D inclusive prefix sum is the gradient of the features: O(M*C + N*C*H*W) as well.
// Which cells a box covers is defined once, in box_cells.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "box_cells.h"
#include "kd2_ops.h"

#ifdef WITH_CUDA
// c10 headers only (ATen/cuda/CUDAContext.h would also need the cuBLAS / cuSPARSE headers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_kernels.h"
#endif

namespace kd2 {
namespace {

// The boxes grouped by image: the boxes of image n are order[start[n] : start[n + 1]].
struct BoxTable {
  std::vector<BoxCells> cells;
  std::vector<int64_t> order;
  std::vector<int64_t> start;
};

BoxTable make_box_table(
    const char* op,
    const at::Tensor& boxes,
    const at::Tensor& batch_index,
    double stride,
    int64_t N,
    int64_t H,
    int64_t W) {
  const at::Tensor b = boxes.to(at::kDouble).contiguous();
  const at::Tensor idx = batch_index.contiguous();
  const double* bp = b.data_ptr<double>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t M = b.size(0);
  BoxTable t;
  t.cells.resize(M);
  t.order.resize(M);
  t.start.assign(N + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(
        ip[m] >= 0 && ip[m] < N, op, ": batch_index[", m, "] = ", ip[m],
        " is not a valid image index for a batch of ", N, " feature maps");
    t.cells[m] = box_cells(bp + 4 * m, stride, H, W);
    ++t.start[ip[m] + 1];
  }
  for (int64_t n = 0; n < N; ++n) {
    t.start[n + 1] += t.start[n];
  }
  std::vector<int64_t> fill(t.start.begin(), t.start.end() - 1);
  for (int64_t m = 0; m < M; ++m) {
    t.order[fill[ip[m]]++] = m;
  }
  return t;
}

// Summed-area table of one H x W plane into sat ((H + 1) x (W + 1), row 0 and column 0 zero).
template <typename scalar_t>
void integral_image(const scalar_t* x, double* sat, int64_t H, int64_t W) {
  const int64_t W1 = W + 1;
  std::fill(sat, sat + W1, 0.0);
  for (int64_t h = 0; h < H; ++h) {
    const double* prev = sat + h * W1;
    double* row = sat + (h + 1) * W1;
    const scalar_t* xr = x + h * W;
    double run = 0.0;
    row[0] = 0.0;
    for (int64_t w = 0; w < W; ++w) {
      run += static_cast<double>(xr[w]);
      row[w + 1] = prev[w + 1] + run;
    }
  }
}

// Planes per parallel task: about 64k cells of work each.
int64_t plane_grain(int64_t H, int64_t W) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, H * W));
}

}  // namespace

at::Tensor box_mean_pool_cpu(
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& batch_index,
    double stride) {
  const char* op = "kd2::box_mean_pool";
  TORCH_CHECK(features.dim() == 4, op, ": features must be (N, C, H, W), got ", features.sizes());
  check_box_args(op, features, boxes, batch_index, stride);
  const int64_t N = features.size(0), C = features.size(1);
  const int64_t H = features.size(2), W = features.size(3);
  const int64_t M = boxes.size(0);
  at::Tensor out = at::empty({M, C}, features.options());
  if (M == 0 || C == 0) {
    return out;
  }
  TORCH_CHECK(H > 0 && W > 0, op, ": the feature maps are empty (H = ", H, ", W = ", W, ")");
  const BoxTable table = make_box_table(op, boxes, batch_index, stride, N, H, W);
  const at::Tensor x = features.contiguous();
  const int64_t W1 = W + 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "box_mean_pool_cpu", [&] {
        const scalar_t* xp = x.data_ptr<scalar_t>();
        scalar_t* op_ = out.data_ptr<scalar_t>();
        at::parallel_for(0, N * C, plane_grain(H, W), [&](int64_t begin, int64_t end) {
          std::vector<double> sat((H + 1) * W1);
          for (int64_t p = begin; p < end; ++p) {
            const int64_t n = p / C, c = p % C;
            const int64_t b0 = table.start[n], b1 = table.start[n + 1];
            if (b0 == b1) {
              continue;  // no box on this image
            }
            integral_image(xp + p * H * W, sat.data(), H, W);
            for (int64_t i = b0; i < b1; ++i) {
              const int64_t m = table.order[i];
              const BoxCells& bc = table.cells[m];
              const double s = sat[(bc.r1 + 1) * W1 + bc.c1 + 1] - sat[bc.r0 * W1 + bc.c1 + 1] -
                  sat[(bc.r1 + 1) * W1 + bc.c0] + sat[bc.r0 * W1 + bc.c0];
              op_[m * C + c] = static_cast<scalar_t>(s / bc.count());
            }
          }
        });
      });
  return out;
}

at::Tensor box_mean_pool_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& boxes,
    const at::Tensor& batch_index,
    double stride,
    int64_t batch_size,
    int64_t height,
    int64_t width) {
  const char* op = "kd2::box_mean_pool_backward";
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be (M, C), got ", grad.sizes());
  check_box_args(op, grad, boxes, batch_index, stride);
  TORCH_CHECK(grad.size(0) == boxes.size(0), op, ": grad has ", grad.size(0), " rows for ",
              boxes.size(0), " boxes");
  TORCH_CHECK(batch_size >= 0 && height >= 0 && width >= 0, op, ": invalid feature shape");
  const int64_t N = batch_size, C = grad.size(1), H = height, W = width, M = grad.size(0);
  at::Tensor grad_x = at::zeros({N, C, H, W}, grad.options());
  if (M == 0 || C == 0) {
    return grad_x;
  }
  TORCH_CHECK(H > 0 && W > 0, op, ": the feature maps are empty (H = ", H, ", W = ", W, ")");
  const BoxTable table = make_box_table(op, boxes, batch_index, stride, N, H, W);
  const at::Tensor g = grad.contiguous();
  const int64_t W1 = W + 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), "box_mean_pool_backward_cpu", [&] {
        const scalar_t* gp = g.data_ptr<scalar_t>();
        scalar_t* outp = grad_x.data_ptr<scalar_t>();
        at::parallel_for(0, N * C, plane_grain(H, W), [&](int64_t begin, int64_t end) {
          std::vector<double> diff((H + 1) * W1);
          for (int64_t p = begin; p < end; ++p) {
            const int64_t n = p / C, c = p % C;
            const int64_t b0 = table.start[n], b1 = table.start[n + 1];
            if (b0 == b1) {
              continue;  // stays zero
            }
            std::fill(diff.begin(), diff.end(), 0.0);
            for (int64_t i = b0; i < b1; ++i) {
              const int64_t m = table.order[i];
              const BoxCells& bc = table.cells[m];
              const double v = static_cast<double>(gp[m * C + c]) / bc.count();
              diff[bc.r0 * W1 + bc.c0] += v;
              diff[bc.r0 * W1 + bc.c1 + 1] -= v;
              diff[(bc.r1 + 1) * W1 + bc.c0] -= v;
              diff[(bc.r1 + 1) * W1 + bc.c1 + 1] += v;
            }
            // In-place 2-D inclusive prefix sum over the H x W cells (row H and column W only
            // collect the far corners and are never read).
            scalar_t* out_plane = outp + p * H * W;
            for (int64_t h = 0; h < H; ++h) {
              double run = 0.0;
              for (int64_t w = 0; w < W; ++w) {
                run += diff[h * W1 + w];
                const double v = run + (h > 0 ? diff[(h - 1) * W1 + w] : 0.0);
                diff[h * W1 + w] = v;
                out_plane[h * W + w] = static_cast<scalar_t>(v);
              }
            }
          }
        });
      });
  return grad_x;
}

#ifdef WITH_CUDA

namespace {

// Summed-area tables / difference arrays are built this many bytes' worth of planes at a time.
constexpr int64_t kWorkspaceBytes = int64_t{256} << 20;

int64_t chunk_planes(int64_t planes, int64_t H, int64_t W) {
  const int64_t per_plane = (H + 1) * (W + 1) * static_cast<int64_t>(sizeof(double));
  return std::max<int64_t>(1, std::min<int64_t>(planes, kWorkspaceBytes / per_plane));
}

void check_batch_index_range(const char* op, const at::Tensor& batch_index, int64_t N) {
  // One device-to-host copy: the kernels index the feature maps with these values.
  const auto [lo, hi] = at::aminmax(batch_index);
  const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
  TORCH_CHECK(
      lo_v >= 0 && hi_v < N, op, ": batch_index values must lie in [0, ", N, "), got [", lo_v,
      ", ", hi_v, "]");
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

at::Tensor box_mean_pool_cuda(
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& batch_index,
    double stride) {
  const char* op = "kd2::box_mean_pool";
  TORCH_CHECK(features.dim() == 4, op, ": features must be (N, C, H, W), got ", features.sizes());
  check_box_args(op, features, boxes, batch_index, stride);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t N = features.size(0), C = features.size(1);
  const int64_t H = features.size(2), W = features.size(3);
  const int64_t M = boxes.size(0);
  at::Tensor out = at::empty({M, C}, features.options());
  if (M == 0 || C == 0) {
    return out;
  }
  TORCH_CHECK(H > 0 && W > 0, op, ": the feature maps are empty (H = ", H, ", W = ", W, ")");
  check_batch_index_range(op, batch_index, N);
  // The kernels exist for float and double; half / bfloat16 maps are pooled in float.
  const bool is_double = features.scalar_type() == at::kDouble;
  const at::ScalarType compute = is_double ? at::kDouble : at::kFloat;
  const at::Tensor x = features.to(compute).contiguous();
  const at::Tensor b = boxes.to(at::kDouble).contiguous();
  const at::Tensor idx = batch_index.contiguous();
  at::Tensor res = compute == features.scalar_type() ? out : at::empty({M, C}, x.options());
  const int64_t chunk = chunk_planes(N * C, H, W);
  at::Tensor ws = at::empty({chunk * (H + 1) * (W + 1)}, x.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (is_double) {
    err = cuda::box_mean_pool_forward<double>(
        x.data_ptr<double>(), b.data_ptr<double>(), idx.data_ptr<int64_t>(),
        res.data_ptr<double>(), ws.data_ptr<double>(), chunk, N, C, H, W, M, stride, stream);
  } else {
    err = cuda::box_mean_pool_forward<float>(
        x.data_ptr<float>(), b.data_ptr<double>(), idx.data_ptr<int64_t>(),
        res.data_ptr<float>(), ws.data_ptr<double>(), chunk, N, C, H, W, M, stride, stream);
  }
  check_launch(op, err);
  if (!res.is_same(out)) {
    out.copy_(res);
  }
  return out;
}

at::Tensor box_mean_pool_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& boxes,
    const at::Tensor& batch_index,
    double stride,
    int64_t batch_size,
    int64_t height,
    int64_t width) {
  const char* op = "kd2::box_mean_pool_backward";
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be (M, C), got ", grad.sizes());
  check_box_args(op, grad, boxes, batch_index, stride);
  TORCH_CHECK(grad.size(0) == boxes.size(0), op, ": grad has ", grad.size(0), " rows for ",
              boxes.size(0), " boxes");
  TORCH_CHECK(batch_size >= 0 && height >= 0 && width >= 0, op, ": invalid feature shape");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = batch_size, C = grad.size(1), H = height, W = width, M = grad.size(0);
  if (M == 0 || C == 0) {
    return at::zeros({N, C, H, W}, grad.options());
  }
  TORCH_CHECK(H > 0 && W > 0, op, ": the feature maps are empty (H = ", H, ", W = ", W, ")");
  check_batch_index_range(op, batch_index, N);
  const bool is_double = grad.scalar_type() == at::kDouble;
  const at::ScalarType compute = is_double ? at::kDouble : at::kFloat;
  const at::Tensor g = grad.to(compute).contiguous();
  const at::Tensor b = boxes.to(at::kDouble).contiguous();
  const at::Tensor idx = batch_index.contiguous();
  // Every element is written by the kernels (planes without boxes get zeros).
  at::Tensor grad_x = at::empty({N, C, H, W}, g.options());
  const int64_t chunk = chunk_planes(N * C, H, W);
  at::Tensor ws = at::empty({chunk * (H + 1) * (W + 1)}, g.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (is_double) {
    err = cuda::box_mean_pool_backward<double>(
        g.data_ptr<double>(), b.data_ptr<double>(), idx.data_ptr<int64_t>(),
        grad_x.data_ptr<double>(), ws.data_ptr<double>(), chunk, N, C, H, W, M, stride, stream);
  } else {
    err = cuda::box_mean_pool_backward<float>(
        g.data_ptr<float>(), b.data_ptr<double>(), idx.data_ptr<int64_t>(),
        grad_x.data_ptr<float>(), ws.data_ptr<double>(), chunk, N, C, H, W, M, stride, stream);
  }
  check_launch(op, err);
  return grad_x.to(grad.scalar_type());
}

#endif  // WITH_CUDA

}  // namespace kd2
