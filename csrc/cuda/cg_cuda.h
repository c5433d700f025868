#pragma once
#include "core/params.h"
#include "core/views.h"

namespace rext::cuda {

template <class T>
void cg_solve_cuda(Device dev, const CsrView<T>& w, MatrixView<const T> rhs, MatrixView<T> x,
                   int64_t* iterations, double* residuals, const CgParams& p);

}  // namespace rext::cuda
