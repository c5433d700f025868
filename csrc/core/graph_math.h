// Scalar arithmetic shared by the CPU and CUDA kernels (compiled by g++ and nvcc alike, so the
// CPU tests pin down what the GPU computes): the affinity weight f(s), the overflow-safe
// sqrt(d_i d_j) of the symmetric normalisation, and the per-column CG scalar rules.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/params.h"
#include "core/views.h"

namespace rext {

// f(s) = max(s, 0)^gamma ("relu") or max((1 + s) / 2, 0)^gamma ("shift"), in double. Both are
// clamped at 0: "shift" only stays in [0, 1] for unit-norm rows.
REXT_HD double affinity_weight(double s, Weight w, double gamma) {
  const double base = ::fmax(w == Weight::Relu ? s : (1.0 + s) / 2.0, 0.0);
  return gamma == 1.0 ? base : ::pow(base, gamma);
}

// sqrt(a b) for a, b > 0 without overflow or underflow of the product: the exponents are
// split off exactly, so the rounding is that of sqrt(a b) in ordinary ranges.
REXT_HD double sqrt_product(double a, double b) {
  int ea, eb;
  double prod = ::frexp(a, &ea) * ::frexp(b, &eb);
  int e = ea + eb;
  if (e % 2 != 0) {
    prod *= 2;
    e -= 1;
  }
  return ::ldexp(::sqrt(prod), e / 2);
}

// One CG column's scalar state between the vector passes. The CPU keeps an array of these
// fields per column; the CUDA kernel keeps them in device arrays and applies the same rules.
//
// Before the x/r update: a column whose p.Ap is not positive (p vanished: the exact solution
// was reached) stops; otherwise it steps by rs / pAp. Returns the step (0 when inactive).
REXT_HD double cg_step(bool& active, double rs, double pq) {
  if (active && !(pq > 0)) active = false;
  return active ? rs / pq : 0.0;
}

// After the x/r update of iteration `it`: records the iteration count and relative residual of
// an active column, stops it at ||r||/||b|| <= tol, and otherwise returns beta = rs_new / rs
// and advances rs. Returns 0 for inactive or stopping columns (p = r + 0 p).
REXT_HD double cg_advance(bool& active, int64_t it, double rs_new, double& rs, double bnorm,
                          double tol, int64_t& iterations, double& residual) {
  if (!active) return 0.0;
  iterations = it;
  residual = ::sqrt(rs_new) / bnorm;
  if (residual <= tol) {
    active = false;
    return 0.0;
  }
  const double beta = rs_new / rs;
  rs = rs_new;
  return beta;
}

// Initial state from ||b||^2: a zero right-hand side has residual 0 and never runs.
REXT_HD void cg_start(double bb, double tol, bool& active, double& bnorm, int64_t& iterations,
                      double& residual) {
  bnorm = ::sqrt(bb);
  iterations = 0;
  residual = bnorm > 0 ? 1.0 : 0.0;
  active = bnorm > 0 && residual > tol;
}

}  // namespace rext
