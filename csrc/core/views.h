// Non-owning views of the arrays the kernels read and write. Column stride is always 1 (the
// Python layer guarantees it); rows may be strided, so slices like x[::2] need no copy.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define REXT_HD __host__ __device__ __forceinline__
#else
#define REXT_HD inline
#endif

namespace rext {

enum class DeviceKind { CPU, CUDA };

struct Device {
  DeviceKind kind = DeviceKind::CPU;
  int index = 0;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
};

template <class T>
struct MatrixView {
  T* ptr = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;  // in elements
  REXT_HD T* row(int64_t i) const { return ptr + i * row_stride; }
  REXT_HD T& operator()(int64_t i, int64_t j) const { return ptr[i * row_stride + j]; }
};

// The rows of `top` followed by the rows of `bottom` ([T; V] in label propagation), without
// copying them into one buffer. `bottom.rows` may be 0.
template <class T>
struct StackedRows {
  MatrixView<const T> top, bottom;
  REXT_HD int64_t rows() const { return top.rows + bottom.rows; }
  REXT_HD int64_t cols() const { return top.cols; }
  REXT_HD const T* row(int64_t i) const {
    return i < top.rows ? top.row(i) : bottom.row(i - top.rows);
  }
};

// Rows [start, stop) of `x` as a StackedRows of their own, without copying: the part of the
// range inside `top` stays in `top`, the rest is taken from `bottom`.
template <class T>
StackedRows<T> row_range(const StackedRows<T>& x, int64_t start, int64_t stop) {
  const int64_t t = x.top.rows;
  const int64_t top_lo = start < t ? start : t, top_hi = stop < t ? stop : t;
  const int64_t bot_lo = (start > t ? start : t) - t, bot_hi = (stop > t ? stop : t) - t;
  StackedRows<T> r;
  r.top = MatrixView<const T>{x.top.ptr + top_lo * x.top.row_stride, top_hi - top_lo, x.top.cols,
                              x.top.row_stride};
  r.bottom = MatrixView<const T>{x.bottom.ptr ? x.bottom.ptr + bot_lo * x.bottom.row_stride
                                              : x.bottom.ptr,
                                 bot_hi - bot_lo, x.top.cols, x.bottom.row_stride};
  return r;
}

// Compressed sparse rows of a square matrix; column indices sorted within each row.
template <class T>
struct CsrView {
  const int64_t* indptr = nullptr;  // rows + 1
  const int64_t* indices = nullptr; // nnz
  const T* data = nullptr;          // nnz
  int64_t rows = 0;
  int64_t nnz = 0;
};

}  // namespace rext
