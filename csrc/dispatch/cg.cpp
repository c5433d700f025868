#include <stdexcept>

#include "cpu/cg_cpu.h"
#include "dispatch/ops.h"
#ifdef REXT_WITH_CUDA
#include "cuda/cg_cuda.h"
#endif

namespace rext {

template <class T>
void cg_solve(Device dev, const CsrView<T>& w, MatrixView<const T> rhs, MatrixView<T> x,
              int64_t* iterations, double* residuals, const CgParams& p) {
  if (dev.kind == DeviceKind::CPU)
    return cpu::cg_solve_cpu(w, rhs, x, iterations, residuals, p);
#ifdef REXT_WITH_CUDA
  return cuda::cg_solve_cuda(dev, w, rhs, x, iterations, residuals, p);
#else
  throw std::runtime_error("reclip_ext was built without CUDA");
#endif
}

template void cg_solve<float>(Device, const CsrView<float>&, MatrixView<const float>,
                              MatrixView<float>, int64_t*, double*, const CgParams&);
template void cg_solve<double>(Device, const CsrView<double>&, MatrixView<const double>,
                               MatrixView<double>, int64_t*, double*, const CgParams&);

}  // namespace rext
