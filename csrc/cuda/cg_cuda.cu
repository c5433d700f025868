// CUDA batched CG: not written yet (issue 3); see affinity_cuda.cu.
#include <stdexcept>

#include "cuda/cg_cuda.h"

namespace rext::cuda {

template <class T>
void cg_solve_cuda(Device, const CsrView<T>&, MatrixView<const T>, MatrixView<T>, int64_t*,
                   double*, const CgParams&) {
  throw std::runtime_error("cg_solve: the CUDA kernel is not implemented in this version; "
                           "move the arrays to the CPU");
}

template void cg_solve_cuda<float>(Device, const CsrView<float>&, MatrixView<const float>,
                                   MatrixView<float>, int64_t*, double*, const CgParams&);
template void cg_solve_cuda<double>(Device, const CsrView<double>&, MatrixView<const double>,
                                    MatrixView<double>, int64_t*, double*, const CgParams&);

}  // namespace rext::cuda
