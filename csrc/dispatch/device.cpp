// What this build and this machine offer.
#include <stdexcept>

#include "core/workspace_layout.h"
#include "cpu/tile_kernels.h"
#include "dispatch/ops.h"
#ifdef REXT_WITH_CUDA
#include "cuda/device_cuda.h"
#include "cuda/normalize_cuda.h"
#endif
#ifdef REXT_HAVE_CUSPARSE
#include "cuda/cusparse_lib.h"
#endif

namespace rext {

#ifdef REXT_WITH_CUDA
bool built_with_cuda() { return true; }
int cuda_device_count() { return cuda::device_count(); }
#else
bool built_with_cuda() { return false; }
int cuda_device_count() { return 0; }
#endif

#ifdef REXT_HAVE_CUSPARSE
bool built_with_cusparse() { return true; }
std::string load_cusparse(const std::vector<std::string>& candidates) {
  return cuda::load_cusparse(candidates);
}
#else
bool built_with_cusparse() { return false; }
std::string load_cusparse(const std::vector<std::string>&) {
  throw std::runtime_error("spmm: 'cusparse' is not in this build of reclip_ext (cusparse.h "
                           "was not found when it was compiled); use spmm='kernel'");
}
#endif

int64_t knn_affinity_workspace_bytes(int64_t n, int64_t d, int64_t k, bool dbl, Precision prec,
                                     int64_t nq, bool separate) {
  return affinity_layout(n, d, k, dbl ? 8 : 4, prec, nq, separate).total;
}

int64_t cg_solve_workspace_bytes(int64_t n, int64_t m, bool dbl) {
  return cg_layout(n, m, dbl ? 8 : 4).total;
}

int64_t sym_normalize_workspace_bytes(Device dev, int64_t n, int64_t k, bool dbl) {
#ifdef REXT_WITH_CUDA
  return cuda::sym_normalize_workspace_bytes_cuda(dev, n, k, dbl);
#else
  (void)dev, (void)n, (void)k, (void)dbl;
  throw std::runtime_error("reclip_ext was built without CUDA");
#endif
}

const char* simd_level() { return cpu::simd_level(); }

}  // namespace rext
