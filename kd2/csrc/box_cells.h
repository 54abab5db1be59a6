// Which feature-map cells a box covers in kd2::box_mean_pool. Header-only and free of ATen so
// that the CPU kernels (C++) and the CUDA kernels (nvcc) share one definition.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KD2_HOST_DEVICE __host__ __device__
#else
#define KD2_HOST_DEVICE
#endif

namespace kd2 {

// Cell index of one box coordinate on a feature map of `size` cells along that axis:
// floor(|coord| / stride), computed in double precision, then clamped into [0, size - 1].
// The absolute value follows the Global-Knowledge (ECCV 2022) code, which uses
// int(abs(coord) / stride); for coord >= 0 it is the usual floor(coord / stride).
// NaN maps to 0 and +-inf to size - 1 (non-finite boxes are not supported, only kept in bounds).
KD2_HOST_DEVICE inline int64_t box_cell(double coord, double stride, int64_t size) {
  const double v = floor(fabs(coord) / stride);
  if (!(v > 0.0)) {
    return 0;
  }
  if (v >= static_cast<double>(size - 1)) {
    return size - 1;
  }
  return static_cast<int64_t>(v);
}

// Inclusive cell rectangle [r0, r1] x [c0, c1] of a box (x1, y1, x2, y2). The two row indices
// (and the two column indices) are sorted, so an inverted box (y2 < y1, or |y2| < |y1| after the
// absolute value) covers the cells between its two edges instead of nothing.
struct BoxCells {
  int64_t r0;
  int64_t r1;
  int64_t c0;
  int64_t c1;
  KD2_HOST_DEVICE double count() const {
    return static_cast<double>((r1 - r0 + 1) * (c1 - c0 + 1));
  }
};

KD2_HOST_DEVICE inline BoxCells box_cells(
    const double* box, double stride, int64_t height, int64_t width) {
  const int64_t ya = box_cell(box[1], stride, height);
  const int64_t yb = box_cell(box[3], stride, height);
  const int64_t xa = box_cell(box[0], stride, width);
  const int64_t xb = box_cell(box[2], stride, width);
  BoxCells cells;
  cells.r0 = ya < yb ? ya : yb;
  cells.r1 = ya < yb ? yb : ya;
  cells.c0 = xa < xb ? xa : xb;
  cells.c1 = xa < xb ? xb : xa;
  return cells;
}

}  // namespace kd2
