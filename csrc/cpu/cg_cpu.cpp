// Batched CG on the CPU. The m recurrences share one CSR x dense product per iteration; the
// per-column dot products are accumulated in double, fused into the passes that produce
// their operands. A column stops updating once ||r||/||b|| <= tol. Each column runs on b scaled
// by a power of two (core/graph_math.h: cg_column_scale) and x is scaled back at the end.
#include "cpu/cg_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/check.h"
#include "core/graph_math.h"
#include "cpu/workspace.h"

namespace rext::cpu {
namespace {

constexpr int64_t kPrefetchEdges = 8;

// sums[j] = sum over threads of per-thread partials: each thread adds its own vector once.
void reduce_into(std::vector<double>& sums, const std::vector<double>& part) {
#pragma omp critical
  for (size_t j = 0; j < sums.size(); ++j) sums[j] += part[j];
}

}  // namespace

template <class T>
void cg_solve_cpu(const CsrView<T>& w, MatrixView<const T> rhs, MatrixView<T> x,
                  int64_t* iterations, double* residuals, const CgParams& p) {
  const int64_t n = w.rows, m = rhs.cols;
  REXT_CHECK(w.indptr[0] == 0 && w.indptr[n] == w.nnz, "W: indptr must start at 0 and end at nnz");
  for (int64_t i = 0; i < n; ++i)
    REXT_CHECK(w.indptr[i] <= w.indptr[i + 1], "W: indptr must be non-decreasing (row ", i, ")");
  for (int64_t e = 0; e < w.nnz; ++e)
    REXT_CHECK(w.indices[e] >= 0 && w.indices[e] < n, "W: column index ", w.indices[e],
               " at position ", e, " is outside [0, ", n, ")");
  const int threads = resolve_threads(p.threads);
  check_workspace(3.0 * double(n) * double(m) * sizeof(T), "cg_solve");

  // scale_j from max |b_j|; then r = p = b_j scale_j, x = 0 (the solve starts from zero).
  AlignedBuffer<T> r = aligned_buffer<T>(n * m), dir = aligned_buffer<T>(n * m),
                   q = aligned_buffer<T>(n * m);
  std::vector<double> rs(m, 0.0), bnorm(m, 0.0), scale(m, 0.0);
  const T alpha = T(p.alpha);
  const int64_t row_bytes = m * int64_t(sizeof(T));
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> part(m, 0.0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) part[j] = std::max(part[j], std::abs(double(rhs(i, j))));
#pragma omp critical
    for (int64_t j = 0; j < m; ++j) scale[j] = std::max(scale[j], part[j]);
  }
  for (int64_t j = 0; j < m; ++j) scale[j] = cg_column_scale(scale[j]);
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> part(m, 0.0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* b = rhs.row(i);
      T* xi = x.row(i);
      for (int64_t j = 0; j < m; ++j) {
        const T v = T(double(b[j]) * scale[j]);
        r[i * m + j] = dir[i * m + j] = v;
        xi[j] = T(0);
        part[j] += double(v) * double(v);
      }
    }
    reduce_into(rs, part);
  }
  std::vector<char> active(m);
  for (int64_t j = 0; j < m; ++j) {
    bool on;
    cg_start(rs[j], p.tol, on, bnorm[j], iterations[j], residuals[j]);
    active[j] = on;
  }
  const double floor = cg_residual_floor(n, double(std::numeric_limits<T>::min()));
  // The first column found broken; the solve is refused once the pass that found it is done.
  int64_t broken_col = -1;
  auto stop = [&](int64_t j, bool on, bool broken) {
    active[j] = on;
    if (broken && broken_col < 0) broken_col = j;
  };

  std::vector<double> pq(m), pp(m), rs_new(m);
  std::vector<T> step(m), beta(m);
  for (int64_t it = 1; it <= p.max_iter; ++it) {
    if (std::none_of(active.begin(), active.end(), [](char a) { return a; })) break;
    // q = (I - alpha W) p, pq_j = p_j . q_j and pp_j = p_j . p_j
    std::fill(pq.begin(), pq.end(), 0.0);
    std::fill(pp.begin(), pp.end(), 0.0);
#pragma omp parallel num_threads(threads)
    {
      std::vector<double> part(m, 0.0), part_pp(m, 0.0);
      std::vector<T> acc(m);
#pragma omp for schedule(dynamic, 64)
      for (int64_t i = 0; i < n; ++i) {
        std::fill(acc.begin(), acc.end(), T(0));
        const int64_t end = w.indptr[i + 1];
        for (int64_t e = w.indptr[i]; e < end; ++e) {
          // The neighbour rows are scattered over P: fetch a few edges ahead so that the
          // misses overlap instead of stalling one after another.
          if (e + kPrefetchEdges < w.nnz) {
            const char* ahead = reinterpret_cast<const char*>(dir.get() + w.indices[e + kPrefetchEdges] * m);
            for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(ahead + b);
          }
          const T v = w.data[e];
          const T* __restrict pj = dir.get() + w.indices[e] * m;
          T* __restrict a = acc.data();
          for (int64_t j = 0; j < m; ++j) a[j] += v * pj[j];
        }
        const T* pi = dir.get() + i * m;
        T* qi = q.get() + i * m;
        for (int64_t j = 0; j < m; ++j) {
          qi[j] = pi[j] - alpha * acc[j];
          part[j] += double(pi[j]) * double(qi[j]);
          part_pp[j] += double(pi[j]) * double(pi[j]);
        }
      }
      reduce_into(pq, part);
      reduce_into(pp, part_pp);
    }
    for (int64_t j = 0; j < m; ++j) {
      bool on = active[j], broken = false;
      step[j] = T(cg_step(on, broken, rs[j], pq[j], pp[j]));
      stop(j, on, broken);
    }
    if (broken_col >= 0) throw_cg_breakdown(broken_col);
    // x += a p, r -= a q, rs_new_j = r_j . r_j
    std::fill(rs_new.begin(), rs_new.end(), 0.0);
#pragma omp parallel num_threads(threads)
    {
      std::vector<double> part(m, 0.0);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        T* xi = x.row(i);
        T* ri = r.get() + i * m;
        const T* pi = dir.get() + i * m;
        const T* qi = q.get() + i * m;
        for (int64_t j = 0; j < m; ++j) {
          xi[j] += step[j] * pi[j];
          ri[j] -= step[j] * qi[j];
          part[j] += double(ri[j]) * double(ri[j]);
        }
      }
      reduce_into(rs_new, part);
    }
    for (int64_t j = 0; j < m; ++j) {
      bool on = active[j], broken = false;
      beta[j] = T(cg_advance(on, broken, it, rs_new[j], rs[j], bnorm[j], p.tol, floor,
                             iterations[j], residuals[j]));
      stop(j, on, broken);
    }
    if (broken_col >= 0) throw_cg_breakdown(broken_col);
    // p = r + beta p
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* ri = r.get() + i * m;
      T* pi = dir.get() + i * m;
      for (int64_t j = 0; j < m; ++j) pi[j] = ri[j] + beta[j] * pi[j];
    }
  }
  // x = x_scaled / scale_j (exact, a power of two), unless the true solution overflows.
  int64_t overflow_col = -1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T* xi = x.row(i);
    for (int64_t j = 0; j < m; ++j) {
      xi[j] = T(double(xi[j]) / scale[j]);
      if (!std::isfinite(xi[j])) {
#pragma omp critical
        overflow_col = overflow_col < 0 ? j : std::min(overflow_col, j);
      }
    }
  }
  if (overflow_col >= 0) throw_cg_overflow(overflow_col, sizeof(T) == 8);
}

template void cg_solve_cpu<float>(const CsrView<float>&, MatrixView<const float>,
                                  MatrixView<float>, int64_t*, double*, const CgParams&);
template void cg_solve_cpu<double>(const CsrView<double>&, MatrixView<const double>,
                                   MatrixView<double>, int64_t*, double*, const CgParams&);

}  // namespace rext::cpu
