#pragma once
#include "core/params.h"
#include "core/views.h"

namespace rext::cpu {

// Batched conjugate gradient for (I - alpha W) X = B, all m columns at once (docs/mathematics.md §2, step 5).
// x: (N, m) output; iterations: (m,) per-column iteration count; residuals: (m,) final
// ||r_j|| / ||b_j|| (0 for a zero right-hand side).
template <class T>
void cg_solve_cpu(const CsrView<T>& w, MatrixView<const T> rhs, MatrixView<T> x,
                  int64_t* iterations, double* residuals, const CgParams& p);

}  // namespace rext::cpu
