// Batched CG on the CPU. The m recurrences share one CSR x dense product per iteration; the
// per-column dot products are accumulated in double, fused into the passes that produce
// their operands. A column stops updating once ||r||/||b|| <= tol. Each column runs on b scaled
// by a power of two (core/graph_math.h: cg_column_scale) and x is scaled back at the end.
#include "cpu/cg_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/check.h"
#include "core/graph_math.h"
#include "cpu/team_barrier.h"
#include "cpu/workspace.h"

namespace rext::cpu {
namespace {

constexpr int64_t kPrefetchEdges = 8;

// Per-thread partial sums of m columns, one slot per thread, added up in thread order (the
// slots of threads that a smaller team did not start stay zero).
class Partials {
 public:
  Partials(int threads, int64_t m) : m_(m), data_(size_t(threads) * size_t(m), 0.0) {}
  double* slot(int thread) { return data_.data() + int64_t(thread) * m_; }
  // out[j] = the sum over all slots; every thread that calls it gets the same values.
  void sum(std::vector<double>& out) const {
    std::fill(out.begin(), out.end(), 0.0);
    for (size_t at = 0; at < data_.size(); at += size_t(m_))
      for (int64_t j = 0; j < m_; ++j) out[j] += data_[at + j];
  }

 private:
  int64_t m_;
  std::vector<double> data_;
};

}  // namespace

// The whole solve is one parallel region: the vector passes are shared out among the threads,
// and between them the threads meet at a TeamBarrier (three per iteration). Every thread adds
// up the partial dot products and runs the per-column scalar rules itself, on its own copy of
// the column state, so no pass waits for one thread to do the scalar work; thread 0's copy is
// the one written to `iterations` and `residuals`.
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
  // One iteration: the product with W, then three passes over the n x m vectors.
  const int threads = resolve_threads(p.threads, double(w.nnz + 3 * n) * double(m));
  check_workspace(3.0 * double(n) * double(m) * sizeof(T), "cg_solve");

  AlignedBuffer<T> r = aligned_buffer<T>(n * m), dir = aligned_buffer<T>(n * m),
                   q = aligned_buffer<T>(n * m);
  const T alpha = T(p.alpha);
  const int64_t row_bytes = m * int64_t(sizeof(T));
  const double floor = cg_residual_floor(n, double(std::numeric_limits<T>::min()));
  Partials part_max(threads, m), part_pq(threads, m), part_pp(threads, m), part_rs(threads, m);
  TeamBarrier barrier;
  // The first column found broken (the same on every thread), or -1; refused after the region.
  int64_t broken_col = -1;
  std::vector<int64_t> overflow_cols(threads, -1);

#pragma omp parallel num_threads(threads)
  {
    const int me = omp_get_thread_num();
#pragma omp single
    barrier.set_count(omp_get_num_threads());
    // This thread's copy of the column state; thread 0 records into the outputs.
    std::vector<int64_t> own_iterations(me == 0 ? 0 : m);
    std::vector<double> own_residuals(me == 0 ? 0 : m);
    int64_t* its = me == 0 ? iterations : own_iterations.data();
    double* res = me == 0 ? residuals : own_residuals.data();
    std::vector<char> active(m);
    std::vector<double> rs(m), sums(m), sums_pp(m);
    std::vector<T> step(m), beta(m);
    std::vector<T> acc(m);
    int64_t broken = -1;
    auto stop = [&](int64_t j, bool on, bool is_broken) {
      active[j] = on;
      if (is_broken && broken < 0) broken = j;
    };

    // scale_j from max |b_j|; then r = p = b_j scale_j, x = 0 (the solve starts from zero).
    double* mx = part_max.slot(me);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) mx[j] = std::max(mx[j], std::abs(double(rhs(i, j))));
    barrier.wait();
    std::vector<double> own_scale(m, 0.0);
    for (int t = 0; t < threads; ++t)
      for (int64_t j = 0; j < m; ++j) own_scale[j] = std::max(own_scale[j], part_max.slot(t)[j]);
    for (int64_t j = 0; j < m; ++j) own_scale[j] = cg_column_scale(own_scale[j]);
    double* rr = part_rs.slot(me);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i) {
      const T* b = rhs.row(i);
      T* xi = x.row(i);
      for (int64_t j = 0; j < m; ++j) {
        const T v = T(double(b[j]) * own_scale[j]);
        r[i * m + j] = dir[i * m + j] = v;
        xi[j] = T(0);
        rr[j] += double(v) * double(v);
      }
    }
    barrier.wait();
    part_rs.sum(rs);
    std::vector<double> own_bnorm(m);
    for (int64_t j = 0; j < m; ++j) {
      bool on;
      cg_start(rs[j], p.tol, on, own_bnorm[j], its[j], res[j]);
      active[j] = on;
    }

    for (int64_t it = 1; it <= p.max_iter && broken < 0; ++it) {
      if (std::none_of(active.begin(), active.end(), [](char a) { return a; })) break;
      // q = (I - alpha W) p, pq_j = p_j . q_j and pp_j = p_j . p_j
      double* pq = part_pq.slot(me);
      double* pp = part_pp.slot(me);
      std::fill(pq, pq + m, 0.0);
      std::fill(pp, pp + m, 0.0);
#pragma omp for schedule(dynamic, 64) nowait
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
          pq[j] += double(pi[j]) * double(qi[j]);
          pp[j] += double(pi[j]) * double(pi[j]);
        }
      }
      barrier.wait();
      part_pq.sum(sums);
      part_pp.sum(sums_pp);
      for (int64_t j = 0; j < m; ++j) {
        bool on = active[j], is_broken = false;
        step[j] = T(cg_step(on, is_broken, rs[j], sums[j], sums_pp[j]));
        stop(j, on, is_broken);
      }
      if (broken >= 0) break;
      // x += a p, r -= a q, rs_new_j = r_j . r_j
      double* rn = part_rs.slot(me);
      std::fill(rn, rn + m, 0.0);
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < n; ++i) {
        T* xi = x.row(i);
        T* ri = r.get() + i * m;
        const T* pi = dir.get() + i * m;
        const T* qi = q.get() + i * m;
        for (int64_t j = 0; j < m; ++j) {
          xi[j] += step[j] * pi[j];
          ri[j] -= step[j] * qi[j];
          rn[j] += double(ri[j]) * double(ri[j]);
        }
      }
      barrier.wait();
      part_rs.sum(sums);
      for (int64_t j = 0; j < m; ++j) {
        bool on = active[j], is_broken = false;
        beta[j] = T(cg_advance(on, is_broken, it, sums[j], rs[j], own_bnorm[j], p.tol, floor,
                               its[j], res[j]));
        stop(j, on, is_broken);
      }
      if (broken >= 0) break;
      // p = r + beta p (the rows this thread updated r in: the same static schedule)
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < n; ++i) {
        const T* ri = r.get() + i * m;
        T* pi = dir.get() + i * m;
        for (int64_t j = 0; j < m; ++j) pi[j] = ri[j] + beta[j] * pi[j];
      }
      barrier.wait();
    }
    if (me == 0) broken_col = broken;

    // x = x_scaled / scale_j (exact, a power of two), unless the true solution overflows.
    // x's rows were last written by this thread's static share, so no barrier is needed.
    if (broken < 0) {
      int64_t& overflow = overflow_cols[me];
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < n; ++i) {
        T* xi = x.row(i);
        for (int64_t j = 0; j < m; ++j) {
          xi[j] = T(double(xi[j]) / own_scale[j]);
          if (!std::isfinite(xi[j]) && (overflow < 0 || j < overflow)) overflow = j;
        }
      }
    }
  }
  if (broken_col >= 0) throw_cg_breakdown(broken_col);
  int64_t overflow_col = -1;
  for (int64_t c : overflow_cols)
    if (c >= 0 && (overflow_col < 0 || c < overflow_col)) overflow_col = c;
  if (overflow_col >= 0) throw_cg_overflow(overflow_col, sizeof(T) == 8);
}

template void cg_solve_cpu<float>(const CsrView<float>&, MatrixView<const float>,
                                  MatrixView<float>, int64_t*, double*, const CgParams&);
template void cg_solve_cpu<double>(const CsrView<double>&, MatrixView<const double>,
                                   MatrixView<double>, int64_t*, double*, const CgParams&);

}  // namespace rext::cpu
