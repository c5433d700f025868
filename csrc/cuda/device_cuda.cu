#include <cuda_runtime.h>

#include "cuda/device_cuda.h"

namespace rext::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

}  // namespace rext::cuda
