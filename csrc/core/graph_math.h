// Scalar arithmetic shared by the CPU and CUDA kernels (compiled by g++ and nvcc alike, so the
// CPU tests pin down what the GPU computes): the affinity weight f(s), the overflow-safe
// sqrt(d_i d_j) of the symmetric normalisation, and the per-column CG scalar rules; plus the
// host-side errors both devices raise from these rules.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/check.h"
#include "core/params.h"
#include "core/views.h"

namespace rext {

// f(s) = max(s, 0)^gamma ("relu") or max((1 + s) / 2, 0)^gamma ("shift"), in double. Both are
// clamped at 0: "shift" only stays in [0, 1] for unit-norm rows.
REXT_HD double affinity_weight(double s, Weight w, double gamma) {
  const double base = ::fmax(w == Weight::Relu ? s : (1.0 + s) / 2.0, 0.0);
  return gamma == 1.0 ? base : ::pow(base, gamma);
}

// Largest row norm for which no similarity x_i . x_j, nor any partial sum of one, can overflow
// a type whose largest value is `max` (|partial sum| <= ||x_i|| ||x_j|| by Cauchy-Schwarz);
// the factor 1/2 leaves room for the rounding of the sums. Rows L2-normalised first have norm 1.
REXT_HD double similarity_norm_limit(double max) { return 0.5 * ::sqrt(max); }

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
// Each column runs on b_j scaled by the power of two that brings its largest entry into
// [0.5, 1): CG is linear in b, so this scaling is exact (the iterates, steps and stopping
// iterations are bitwise those of the unscaled run wherever that one stays in range), and it
// keeps ||r||^2 and p.Ap far from overflow and underflow whatever the magnitude of b.
// Returns 1 for a zero column.
REXT_HD double cg_column_scale(double bmax) {
  if (!(bmax > 0)) return 1.0;
  int e;
  ::frexp(bmax, &e);
  return ::ldexp(1.0, -e);
}

// Below this ||r||^2 (of the scaled column) the recurrence has nothing left to resolve: the
// entries of r are, on average, smaller than the type's smallest normal number (`tiny`), so
// they carry fewer bits than its epsilon and the next beta and step would be rounding noise,
// which grows into overflow if iterated. For double, n tiny^2 underflows; the floor is then
// where the double sums of squares themselves stop being exact to epsilon.
REXT_HD double cg_residual_floor(int64_t n, double tiny) {
  const double floor_t = double(n) * tiny * tiny;
  const double floor_sum = 2.2250738585072014e-308 / 2.220446049250313e-16;  // DBL_MIN / eps
  return floor_t > floor_sum ? floor_t : floor_sum;
}

// p.Ap of a positive definite A = I - alpha W with spectral radius of alpha W at most 1 is
// positive; rounding can only push it below zero by about (row length) * epsilon * p.p,
// far less than this fraction of p.p. A more negative or a non-finite value is no rounding
// effect: A is not positive definite (or W p overflows), and the solve is refused.
constexpr double kCgBreakdownSlack = 1.0 / 1024;

// Before the x/r update, with pq = p.Ap and pp = p.p: a column whose p.Ap is positive steps
// by rs / pq. Otherwise it stops, and `broken` tells apart a vanished direction (|p.Ap| at
// rounding level: the exact solution was reached) from a matrix that is not positive definite
// or overflowed. Returns the step (0 when inactive).
REXT_HD double cg_step(bool& active, bool& broken, double rs, double pq, double pp) {
  if (!active) return 0.0;
  if (pq > 0 && pq <= 1.7976931348623157e308) return rs / pq;
  active = false;
  broken = !(pq >= -kCgBreakdownSlack * pp) || pq > 1.7976931348623157e308;  // NaN included
  return 0.0;
}

// After the x/r update of iteration `it`: records the iteration count and relative residual of
// an active column, stops it at ||r||/||b|| <= tol or once ||r||^2 < floor (cg_residual_floor:
// converged as far as the type can tell), and otherwise returns beta = rs_new / rs and
// advances rs. A non-finite ||r||^2 (r overflowed) stops the column as broken. Returns 0 for
// inactive or stopping columns (p = r + 0 p).
REXT_HD double cg_advance(bool& active, bool& broken, int64_t it, double rs_new, double& rs,
                          double bnorm, double tol, double floor, int64_t& iterations,
                          double& residual) {
  if (!active) return 0.0;
  if (!(rs_new <= 1.7976931348623157e308)) {
    active = false;
    broken = true;
    return 0.0;
  }
  iterations = it;
  residual = ::sqrt(rs_new) / bnorm;
  if (residual <= tol || rs_new < floor) {
    active = false;
    return 0.0;
  }
  const double beta = rs_new / rs;
  rs = rs_new;
  return beta;
}

// Initial state from ||b||^2 (of the scaled column): a zero right-hand side has residual 0 and
// never runs.
REXT_HD void cg_start(double bb, double tol, bool& active, double& bnorm, int64_t& iterations,
                      double& residual) {
  bnorm = ::sqrt(bb);
  iterations = 0;
  residual = bnorm > 0 ? 1.0 : 0.0;
  active = bnorm > 0 && residual > tol;
}

// Overflowed similarities would leave inf weights, and inf - inf NaNs that the top-k silently
// drops, so rows that could overflow are refused before any work.
inline void check_similarity_norm(double largest, bool dbl) {
  const double limit = similarity_norm_limit(dbl ? 1.7976931348623157e308 : 3.4028234663852886e38);
  REXT_CHECK(largest <= limit, "x: row norms must be at most ", limit, " for the ",
             dbl ? "float64" : "float32", " similarities x_i . x_j not to overflow (largest is ",
             largest, "); scale x down, pass normalize=True", dbl ? "" : " or use float64");
}

// f(s) itself may overflow the output type for gamma > 1 although s does not; `fits` says
// whether the weight of similarity s came out finite.
inline void check_weight(bool fits, double s, double gamma, bool dbl) {
  REXT_CHECK(fits,
             "gamma: the weights f(s) = max(s, 0)^gamma must fit in ", dbl ? "float64" : "float32",
             " (similarity ", s, " with gamma ", gamma,
             " overflows); lower gamma, scale x down or pass normalize=True");
}

// The errors a CG solve ends with, the same on every device. A broken column: W makes
// I - alpha W indefinite or overflows the type; its iterates would be meaningless.
[[noreturn]] inline void throw_cg_breakdown(int64_t column) {
  throw std::invalid_argument(detail::concat(
      "W: I - alpha W must be symmetric positive definite, as for a symmetric W with "
      "eigenvalues in [-1, 1] such as sym_normalize gives (CG broke down on rhs column ",
      column, ": p.(I - alpha W)p <= 0 or overflow)"));
}

// x = (I - alpha W)^-1 b can exceed the type's range although b does not.
[[noreturn]] inline void throw_cg_overflow(int64_t column, bool dbl) {
  throw std::invalid_argument(detail::concat(
      "rhs: the solution must fit in ", dbl ? "float64" : "float32", " (column ", column,
      " overflows); scale rhs down", dbl ? "" : " or use float64"));
}

}  // namespace rext
