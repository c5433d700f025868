// What this build and this machine offer.
#include "cpu/tile_kernels.h"
#include "dispatch/ops.h"
#ifdef REXT_WITH_CUDA
#include "cuda/device_cuda.h"
#endif

namespace rext {

#ifdef REXT_WITH_CUDA
bool built_with_cuda() { return true; }
int cuda_device_count() { return cuda::device_count(); }
#else
bool built_with_cuda() { return false; }
int cuda_device_count() { return 0; }
#endif

const char* simd_level() { return cpu::simd_level(); }

}  // namespace rext
