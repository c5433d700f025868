#include <stdexcept>

#include "core/check.h"
#include "cpu/cg_cpu.h"
#include "dispatch/ops.h"
#ifdef REXT_WITH_CUDA
#include "cuda/cg_cuda.h"
#endif

namespace rext {

template <class T>
void cg_solve(Device dev, const CsrView<T>& w, MatrixView<const T> rhs, MatrixView<T> x,
              int64_t* iterations, double* residuals, const CgParams& p) {
  // Checks every device shares; each kernel adds only its own.
  const int64_t n = w.rows, m = rhs.cols;
  REXT_CHECK(rhs.rows == n, "rhs: expected ", n, " rows to match W, got ", rhs.rows);
  REXT_CHECK(x.rows == n && x.cols == m, "x: expected shape (", n, ", ", m, ")");
  REXT_CHECK(p.alpha >= 0 && p.alpha < 1, "alpha must be in [0, 1), got ", p.alpha);
  REXT_CHECK(p.max_iter >= 0, "max_iter must be >= 0, got ", p.max_iter);
  REXT_CHECK(p.tol >= 0, "tol must be >= 0, got ", p.tol);
  REXT_CHECK(p.spmm == Spmm::Kernel || dev.kind == DeviceKind::CUDA,
             "spmm: 'cusparse' runs on CUDA only; CPU arrays take spmm='kernel'");
  if (dev.kind == DeviceKind::CPU)
    return cpu::cg_solve_cpu(w, rhs, x, iterations, residuals, p);
  // cuSPARSE opened (once per process), or the error of a build or machine without it
  if (p.spmm == Spmm::Cusparse) load_cusparse({});
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
