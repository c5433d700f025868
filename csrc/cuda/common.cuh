// Helpers shared by the CUDA kernels: a device guard (the op runs on the input's device and
// the caller's device is restored), workspace checks and warp reductions.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "core/check.h"
#include "core/params.h"
#include "cuda/cuda_check.cuh"

namespace rext::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

class DeviceGuard {
 public:
  explicit DeviceGuard(int index) {
    REXT_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != index) REXT_CUDA_CHECK(cudaSetDevice(index));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline char* workspace_base(const Workspace& w, int64_t need, const char* op) {
  REXT_CHECK(w.ptr != nullptr && w.bytes >= need, op, ": workspace of ", w.bytes,
             " bytes is smaller than the ", need, " bytes required (size it with ", op,
             "_workspace_bytes)");
  REXT_CHECK(reinterpret_cast<uintptr_t>(w.ptr) % 256 == 0, op,
             ": workspace must be 256-byte aligned");
  return static_cast<char*>(w.ptr);
}

inline unsigned blocks_for(int64_t items, int64_t per_block) {
  const int64_t b = (items + per_block - 1) / per_block;
  REXT_CHECK(b <= 0x7fffffff, "problem too large for one launch (", items, " items)");
  return unsigned(b > 0 ? b : 1);
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = ::fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

}  // namespace rext::cuda
