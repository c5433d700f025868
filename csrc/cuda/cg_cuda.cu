// Batched CG on the GPU for (I - alpha W) X = B, W in CSR, B N x m: the m columns are m
// independent recurrences sharing one sparse x dense product per iteration, with the same
// stopping rule, column scaling and reporting as cg_cpu.cpp (the scalar rules are
// core/graph_math.h).
//
// Layout of every vector pass: a CTA is 8 warps x one 32-column chunk (blockIdx.y); each warp
// walks rows (grid-stride), lane = column, so a warp reads 32 consecutive columns of one row
// (coalesced). Per-column dot products are summed in double in registers, reduced over the
// CTA's warps in shared memory and added with one double atomic per column per CTA.
// Before: colmax (max |b_j|, turned into the power-of-two scale_j), init (r = p = b scale_j).
// Per iteration:
//   spmm:    q = p - alpha W p, pq_j += p_j . q_j, pp_j += p_j . p_j  (fused; a warp per row,
//            lanes = columns, up to 128 columns per CTA; see spmm). Or, with
//            CgParams::spmm = Cusparse: cuSPARSE's q = W p, then finish_q (q = p - alpha q and
//            the two dot products, active columns only).
//   step:    per column, step = rs / pq or stop            (one tiny kernel)
//   update:  x += step p, r -= step q, rs_new_j += r_j . r_j
//   advance: per column, residual, stop test, beta         (one tiny kernel; counts active)
//   direction: p = r + beta p
// After: unscale (x /= scale_j, flagging a solution that overflows).
// Converged columns are skipped by every pass (a chunk with no active column exits at once).
// One 8-byte read-back per iteration (the number of active columns and the first broken
// column) ends the loop early or refuses the solve.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "core/check.h"
#include "core/graph_math.h"
#include "core/workspace_layout.h"
#include "cuda/cg_cuda.h"
#include "cuda/common.cuh"
#ifdef REXT_HAVE_CUSPARSE
#include "cuda/cusparse_lib.h"
#endif

namespace rext::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = 32 * kWarpsPerBlock;
constexpr int64_t kMaxRowBlocks = 1024;  // grid-stride: bounds the atomics per reduction

struct State {
  double *rs, *rs_new, *pq, *pp, *bnorm, *step, *beta, *scale;
  int* active;
  int* count;  // [0] active columns, [1] first broken column + 1 (0: none)
};

// Records a broken column (the smallest index wins, as on the CPU).
__device__ __forceinline__ void mark_broken(State s, int64_t j) {
  atomicMin(&s.count[1], int(j) + 1);
}

// Sums `part` over the CTA's warps (same column = same lane) and adds it to out[col]. May be
// called twice in a row: the leading barrier keeps the second call's writes behind the first
// call's reads.
__device__ __forceinline__ void block_add(double part, int64_t col, int64_t m, double* out) {
  __shared__ double sums[kWarpsPerBlock][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  sums[warp][lane] = part;
  __syncthreads();
  if (warp == 0) {
    double s = 0;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) s += sums[w][lane];
    if (col < m && s != 0) atomicAdd(&out[col], s);
  }
}

// scale_j = max_i |b_ij| (as the bits of a non-negative double, which order like its value);
// turned into the column's power-of-two scale by `start`.
template <class T>
__global__ void colmax(MatrixView<const T> b, int64_t n, int64_t m, double* scale) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = int64_t(blockIdx.y) * 32 + lane;
  double big = 0;
  for (int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + warp; col < m && i < n;
       i += int64_t(gridDim.x) * kWarpsPerBlock)
    big = ::fmax(big, ::fabs(double(b(i, col))));
  if (col < m && big > 0)
    atomicMax(reinterpret_cast<unsigned long long*>(&scale[col]),
              static_cast<unsigned long long>(__double_as_longlong(big)));
}

__global__ void scales(double* scale, int64_t m) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m;
       j += int64_t(gridDim.x) * blockDim.x)
    scale[j] = cg_column_scale(scale[j]);
}

// r = b scale, p = r, x = 0, rs_j = r_j . r_j
template <class T>
__global__ void init(MatrixView<const T> b, MatrixView<T> x, T* r, T* p, int64_t n, int64_t m,
                     const double* scale, double* rs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = int64_t(blockIdx.y) * 32 + lane;
  const double sc = col < m ? scale[col] : 1.0;
  double part = 0;
  for (int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + warp; i < n;
       i += int64_t(gridDim.x) * kWarpsPerBlock) {
    if (col >= m) break;
    const T v = T(double(b(i, col)) * sc);
    r[i * m + col] = p[i * m + col] = v;
    x(i, col) = T(0);
    part += double(v) * double(v);
  }
  block_add(part, col, m, rs);
}

__global__ void start(State s, int64_t m, double tol, int64_t* iterations, double* residuals) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m;
       j += int64_t(gridDim.x) * blockDim.x) {
    bool on;
    cg_start(s.rs[j], tol, on, s.bnorm[j], iterations[j], residuals[j]);
    s.active[j] = on;
    s.pq[j] = 0;
    s.pp[j] = 0;
    if (on) atomicAdd(s.count, 1);
  }
}

// q = p - alpha W p, pq_j += p_j . q_j, pp_j += p_j . p_j (active columns only).
// A warp per row (grid-stride) and a chunk of 32 * CPL columns per CTA (lane + 32 j, j < CPL),
// so that each nonzero's gather reads CPL contiguous 128-byte pieces of P's row. The row's
// nonzeros are read once per chunk, 32 at a time, one per lane, and handed out by shuffles;
// kInFlight nonzeros' gathers are all issued before their FMAs, so that kInFlight * CPL loads
// per warp are in flight instead of one. The last group is padded with (row i, 0), a valid
// address whose product adds nothing, so the loop has no bounds check; ops.py has validated
// indptr and indices. The sum per column is taken in the CSR order, as before and as on the
// CPU.
constexpr int kInFlight = 4;

template <class T, int CPL>
__global__ void spmm(const int64_t* indptr, const int64_t* indices, const T* data, const T* p,
                     T* q, int64_t n, int64_t m, T alpha, State s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t col[CPL], at[CPL];  // the column, and where it is read (past m: column m - 1)
  bool act[CPL], any = false;
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    col[j] = (int64_t(blockIdx.y) * CPL + j) * 32 + lane;
    act[j] = col[j] < m && s.active[col[j]];
    at[j] = col[j] < m ? col[j] : m - 1;
    any |= act[j];
  }
  if (!__syncthreads_or(any)) return;  // the whole chunk has converged
  double part[CPL] = {}, part_pp[CPL] = {};
  for (int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + warp; i < n;
       i += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t lo = indptr[i], hi = indptr[i + 1];
    T acc[CPL] = {};
    for (int64_t base = lo; base < hi; base += 32) {
      const int count = int(hi - base < 32 ? hi - base : 32);
      const long long mine_c = lane < count ? indices[base + lane] : i;
      const T mine_v = lane < count ? data[base + lane] : T(0);
      for (int t = 0; t < count; t += kInFlight) {  // t + u <= 31: count <= 32, t % 4 == 0
        long long c[kInFlight];
        T v[kInFlight], g[kInFlight][CPL];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) {
          c[u] = __shfl_sync(kFullMask, mine_c, t + u);
          v[u] = __shfl_sync(kFullMask, mine_v, t + u);
        }
#pragma unroll
        for (int u = 0; u < kInFlight; ++u)
#pragma unroll
          for (int j = 0; j < CPL; ++j) g[u][j] = p[c[u] * m + at[j]];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u)
#pragma unroll
          for (int j = 0; j < CPL; ++j) acc[j] += v[u] * g[u][j];
      }
    }
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      if (!act[j]) continue;
      const T pi = p[i * m + col[j]];
      const T qi = pi - alpha * acc[j];
      q[i * m + col[j]] = qi;
      part[j] += double(pi) * double(qi);
      part_pp[j] += double(pi) * double(pi);
    }
  }
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    block_add(part[j], col[j], m, s.pq);
    block_add(part_pp[j], col[j], m, s.pp);
  }
}

// Columns per lane: as many 32-column pieces per gather as m fills, up to 4 (m = 1000 reads
// its CSR rows 8 times instead of 32; registers stay at a few dozen per thread).
template <class T>
void launch_spmm(const CsrView<T>& w, const T* p, T* q, int64_t m, T alpha, State s,
                 unsigned row_blocks, cudaStream_t stream) {
  const int cpl = m > 64 ? 4 : m > 32 ? 2 : 1;
  const dim3 grid(row_blocks, unsigned((m + 32 * cpl - 1) / (32 * cpl)));
  const int64_t n = w.rows;
  if (cpl == 4)
    spmm<T, 4><<<grid, kThreads, 0, stream>>>(w.indptr, w.indices, w.data, p, q, n, m, alpha, s);
  else if (cpl == 2)
    spmm<T, 2><<<grid, kThreads, 0, stream>>>(w.indptr, w.indices, w.data, p, q, n, m, alpha, s);
  else
    spmm<T, 1><<<grid, kThreads, 0, stream>>>(w.indptr, w.indices, w.data, p, q, n, m, alpha, s);
}

#ifdef REXT_HAVE_CUSPARSE
// q = p - alpha q (q holding W p), pq_j += p_j . q_j, pp_j += p_j . p_j over active columns:
// what the fused spmm does after its gathers, summed in double in the same way.
template <class T>
__global__ void finish_q(const T* p, T* q, int64_t n, int64_t m, T alpha, State s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = int64_t(blockIdx.y) * 32 + lane;
  const bool act = col < m && s.active[col];
  if (!__syncthreads_or(act)) return;
  double part = 0, part_pp = 0;
  for (int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + warp; act && i < n;
       i += int64_t(gridDim.x) * kWarpsPerBlock) {
    const T pi = p[i * m + col];
    const T qi = pi - alpha * q[i * m + col];
    q[i * m + col] = qi;
    part += double(pi) * double(qi);
    part_pp += double(pi) * double(pi);
  }
  block_add(part, col, m, s.pq);
  block_add(part_pp, col, m, s.pp);
}

// q = W p through cuSPARSE's SpMM, for one solve: W in CSR with 64-bit indices, P and Q dense
// row-major n x m (the CG's own layout, so nothing is transposed). CSR_ALG2 is the CSR
// algorithm for row-major dense operands; a cuSPARSE that refuses it for these operands (with
// whatever status) gets ALG_DEFAULT instead. Neither promises the same bits on every run (nor
// does the fused path, whose column sums end in atomics). It computes every column, converged
// or not: that costs work, never correctness, since finish_q, update and direction read only
// active columns.
template <class T>
class CusparseSpmm {
 public:
  CusparseSpmm(int device, const CsrView<T>& w, const T* p, T* q, int64_t m, cudaStream_t stream)
      : api_(cusparse_api()), device_(device), stream_(stream), q_(q), n_(w.rows),
        m_(m), nnz_(w.nnz) {
    if (nnz_ == 0) return;  // W = 0: run() copies p, nothing for cuSPARSE to describe
    try {
      cusparse_check(api_.create_const_csr(&a_, n_, n_, nnz_, w.indptr, w.indices, w.data,
                                           CUSPARSE_INDEX_64I, CUSPARSE_INDEX_64I,
                                           CUSPARSE_INDEX_BASE_ZERO, kType),
                     "cusparseCreateConstCsr");
      cusparse_check(api_.create_const_dn_mat(&b_, n_, m_, m_, p, kType, CUSPARSE_ORDER_ROW),
                     "cusparseCreateConstDnMat");
      cusparse_check(api_.create_dn_mat(&c_, n_, m_, m_, q, kType, CUSPARSE_ORDER_ROW),
                     "cusparseCreateDnMat");
      const T one = T(1), zero = T(0);
      size_t bytes = 0;
      {
        CusparseHandle h(device_, stream_);
        auto size = [&] {
          return api_.spmm_buffer_size(h.get(), CUSPARSE_OPERATION_NON_TRANSPOSE,
                                       CUSPARSE_OPERATION_NON_TRANSPOSE, &one, a_, b_, &zero, c_,
                                       kType, alg_, &bytes);
        };
        if (size() != CUSPARSE_STATUS_SUCCESS) {
          alg_ = CUSPARSE_SPMM_ALG_DEFAULT;
          cusparse_check(size(), "cusparseSpMM_bufferSize (CSR_ALG2 refused, ALG_DEFAULT)");
        }
      }
      // The one allocation of the CG: every other buffer is the caller's workspace, sized by
      // cg_solve_workspace_bytes, plain arithmetic that needs neither a device nor cuSPARSE;
      // this size is cuSPARSE's (its version, algorithm and operands) and exists only once
      // the descriptors do. Stream-ordered on the solve's stream: no device-wide sync, and
      // the memory returns to the pool when the stream reaches the free. A device without
      // memory pools gets a plain allocation (and a synchronising free).
      int pools = 0;
      REXT_CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device_));
      pooled_ = pools != 0;
      if (bytes > 0 && pooled_) REXT_CUDA_CHECK(cudaMallocAsync(&buffer_, bytes, stream_));
      if (bytes > 0 && !pooled_) REXT_CUDA_CHECK(cudaMalloc(&buffer_, bytes));
    } catch (...) {
      release();
      throw;
    }
  }
  ~CusparseSpmm() { release(); }
  CusparseSpmm(const CusparseSpmm&) = delete;
  CusparseSpmm& operator=(const CusparseSpmm&) = delete;

  // q = W p (every column).
  void run() {
    if (nnz_ == 0) {  // W = 0: nothing for cuSPARSE to describe
      REXT_CUDA_CHECK(cudaMemsetAsync(q_, 0, size_t(n_) * size_t(m_) * sizeof(T), stream_));
      return;
    }
    const T one = T(1), zero = T(0);
    CusparseHandle h(device_, stream_);  // the device's handle, locked for this call only
    cusparse_check(api_.spmm(h.get(), CUSPARSE_OPERATION_NON_TRANSPOSE,
                             CUSPARSE_OPERATION_NON_TRANSPOSE, &one, a_, b_, &zero, c_, kType,
                             alg_, buffer_),
                   "cusparseSpMM");
  }

 private:
  static constexpr cudaDataType kType = sizeof(T) == 8 ? CUDA_R_64F : CUDA_R_32F;

  // Statuses ignored: this runs on the way out, also of an exception already thrown.
  void release() {
    if (buffer_ && pooled_) cudaFreeAsync(buffer_, stream_);
    if (buffer_ && !pooled_) cudaFree(buffer_);
    if (c_) api_.destroy_dn_mat(c_);
    if (b_) api_.destroy_dn_mat(b_);
    if (a_) api_.destroy_sp_mat(a_);
    buffer_ = nullptr, c_ = nullptr, b_ = nullptr, a_ = nullptr;
  }

  const CusparseApi& api_;
  int device_;
  cudaStream_t stream_;
  T* q_;
  int64_t n_, m_, nnz_;
  cusparseSpMMAlg_t alg_ = CUSPARSE_SPMM_CSR_ALG2;
  cusparseConstSpMatDescr_t a_ = nullptr;
  cusparseConstDnMatDescr_t b_ = nullptr;
  cusparseDnMatDescr_t c_ = nullptr;
  void* buffer_ = nullptr;
  bool pooled_ = true;
};
#endif

__global__ void step_rule(State s, int64_t m) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m;
       j += int64_t(gridDim.x) * blockDim.x) {
    bool on = s.active[j], broken = false;
    s.step[j] = cg_step(on, broken, s.rs[j], s.pq[j], s.pp[j]);
    s.active[j] = on;
    if (broken) mark_broken(s, j);
    s.rs_new[j] = 0;
  }
}

// x += step p, r -= step q, rs_new_j += r_j . r_j
template <class T>
__global__ void update(MatrixView<T> x, T* r, const T* p, const T* q, int64_t n, int64_t m,
                       State s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = int64_t(blockIdx.y) * 32 + lane;
  const bool act = col < m && s.active[col];
  if (!__syncthreads_or(act)) return;
  const T step = act ? T(s.step[col]) : T(0);
  double part = 0;
  for (int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + warp; act && i < n;
       i += int64_t(gridDim.x) * kWarpsPerBlock) {
    x(i, col) += step * p[i * m + col];
    const T ri = r[i * m + col] - step * q[i * m + col];
    r[i * m + col] = ri;
    part += double(ri) * double(ri);
  }
  block_add(part, col, m, s.rs_new);
}

__global__ void advance(State s, int64_t m, int64_t it, double tol, double floor,
                        int64_t* iterations, double* residuals) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m;
       j += int64_t(gridDim.x) * blockDim.x) {
    bool on = s.active[j], broken = false;
    s.beta[j] = cg_advance(on, broken, it, s.rs_new[j], s.rs[j], s.bnorm[j], tol, floor,
                           iterations[j], residuals[j]);
    s.active[j] = on;
    if (broken) mark_broken(s, j);
    s.pq[j] = 0;
    s.pp[j] = 0;
    if (on) atomicAdd(s.count, 1);
  }
}

// p = r + beta p
template <class T>
__global__ void direction(const T* r, T* p, int64_t n, int64_t m, State s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = int64_t(blockIdx.y) * 32 + lane;
  const bool act = col < m && s.active[col];
  if (!__any_sync(kFullMask, act)) return;
  const T beta = act ? T(s.beta[col]) : T(0);
  for (int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + warp; act && i < n;
       i += int64_t(gridDim.x) * kWarpsPerBlock)
    p[i * m + col] = r[i * m + col] + beta * p[i * m + col];
}

// x /= scale_j (exact, a power of two); a non-finite result (the true solution overflows T)
// records its column + 1 in count[0] (smallest wins).
template <class T>
__global__ void unscale(MatrixView<T> x, int64_t n, int64_t m, const double* scale, int* count) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = int64_t(blockIdx.y) * 32 + lane;
  for (int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + warp; col < m && i < n;
       i += int64_t(gridDim.x) * kWarpsPerBlock) {
    const T v = T(double(x(i, col)) / scale[col]);
    x(i, col) = v;
    if (!isfinite(v)) atomicMin(&count[0], int(col) + 1);
  }
}

// Reads count[0..1] back: the active columns (or, after unscale, the first overflowing column
// + 1) and the first broken column + 1.
void read_count(const int* count, int* host, cudaStream_t stream) {
  REXT_CUDA_CHECK(cudaMemcpyAsync(host, count, 2 * sizeof(int), cudaMemcpyDeviceToHost, stream));
  REXT_CUDA_CHECK(cudaStreamSynchronize(stream));
}

}  // namespace

template <class T>
void cg_solve_cuda(Device dev, const CsrView<T>& w, MatrixView<const T> rhs, MatrixView<T> x,
                   int64_t* iterations, double* residuals, const CgParams& p) {
  const int64_t n = w.rows, m = rhs.cols;
  REXT_CHECK((m + 31) / 32 <= 65535, "rhs: at most ", 65535 * 32, " columns on CUDA, got ", m);
  DeviceGuard guard(dev.index);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const CgLayout l = cg_layout(n, m, sizeof(T));
  char* ws = workspace_base(p.workspace, l.total, "cg_solve");
  T* r = reinterpret_cast<T*>(ws + l.r);
  T* dir = reinterpret_cast<T*>(ws + l.p);
  T* q = reinterpret_cast<T*>(ws + l.q);
  State s;
  s.rs = reinterpret_cast<double*>(ws + l.rs);
  s.rs_new = reinterpret_cast<double*>(ws + l.rs_new);
  s.pq = reinterpret_cast<double*>(ws + l.pq);
  s.pp = reinterpret_cast<double*>(ws + l.pp);
  s.bnorm = reinterpret_cast<double*>(ws + l.bnorm);
  s.step = reinterpret_cast<double*>(ws + l.step);
  s.beta = reinterpret_cast<double*>(ws + l.beta);
  s.scale = reinterpret_cast<double*>(ws + l.scale);
  s.active = reinterpret_cast<int*>(ws + l.active);
  s.count = reinterpret_cast<int*>(ws + l.count);

  const int64_t row_blocks = std::min<int64_t>((n + kWarpsPerBlock - 1) / kWarpsPerBlock,
                                               kMaxRowBlocks);
  const dim3 grid(unsigned(row_blocks), unsigned((m + 31) / 32));
  const unsigned col_blocks = blocks_for(std::min<int64_t>(m, 1 << 20), 256);
  const T alpha = T(p.alpha);

  const double floor = cg_residual_floor(n, double(std::numeric_limits<T>::min()));
  const int kNone = 0x7fffffff;  // count[1] (and count[0] after unscale): no column flagged

  REXT_CUDA_CHECK(cudaMemsetAsync(s.rs, 0, m * sizeof(double), stream));
  REXT_CUDA_CHECK(cudaMemsetAsync(s.scale, 0, m * sizeof(double), stream));
  const int fresh[2] = {0, kNone};
  REXT_CUDA_CHECK(cudaMemcpyAsync(s.count, fresh, sizeof fresh, cudaMemcpyHostToDevice, stream));
  colmax<T><<<grid, kThreads, 0, stream>>>(rhs, n, m, s.scale);
  scales<<<col_blocks, 256, 0, stream>>>(s.scale, m);
  init<T><<<grid, kThreads, 0, stream>>>(rhs, x, r, dir, n, m, s.scale, s.rs);
  start<<<col_blocks, 256, 0, stream>>>(s, m, p.tol, iterations, residuals);
  REXT_CUDA_CHECK(cudaGetLastError());
  int host[2];
  read_count(s.count, host, stream);

#ifdef REXT_HAVE_CUSPARSE
  // (the dispatcher has opened cuSPARSE, or refused Cusparse in a build without it)
  std::unique_ptr<CusparseSpmm<T>> sparse;
  if (p.spmm == Spmm::Cusparse && host[0] > 0)
    sparse = std::make_unique<CusparseSpmm<T>>(dev.index, w, dir, q, m, stream);
#endif
  for (int64_t it = 1; it <= p.max_iter && host[0] > 0; ++it) {
#ifdef REXT_HAVE_CUSPARSE
    if (sparse) {
      sparse->run();
      finish_q<T><<<grid, kThreads, 0, stream>>>(dir, q, n, m, alpha, s);
    } else {
      launch_spmm(w, dir, q, m, alpha, s, unsigned(row_blocks), stream);
    }
#else
    launch_spmm(w, dir, q, m, alpha, s, unsigned(row_blocks), stream);
#endif
    step_rule<<<col_blocks, 256, 0, stream>>>(s, m);
    update<T><<<grid, kThreads, 0, stream>>>(x, r, dir, q, n, m, s);
    REXT_CUDA_CHECK(cudaMemsetAsync(s.count, 0, sizeof(int), stream));
    advance<<<col_blocks, 256, 0, stream>>>(s, m, it, p.tol, floor, iterations, residuals);
    direction<T><<<grid, kThreads, 0, stream>>>(r, dir, n, m, s);
    REXT_CUDA_CHECK(cudaGetLastError());
    read_count(s.count, host, stream);
    if (host[1] != kNone) throw_cg_breakdown(host[1] - 1);
  }
  REXT_CUDA_CHECK(cudaMemcpyAsync(s.count, fresh + 1, sizeof(int), cudaMemcpyHostToDevice,
                                  stream));
  unscale<T><<<grid, kThreads, 0, stream>>>(x, n, m, s.scale, s.count);
  REXT_CUDA_CHECK(cudaGetLastError());
  read_count(s.count, host, stream);
  if (host[0] != kNone) throw_cg_overflow(host[0] - 1, sizeof(T) == 8);
}

template void cg_solve_cuda<float>(Device, const CsrView<float>&, MatrixView<const float>,
                                   MatrixView<float>, int64_t*, double*, const CgParams&);
template void cg_solve_cuda<double>(Device, const CsrView<double>&, MatrixView<const double>,
                                    MatrixView<double>, int64_t*, double*, const CgParams&);

}  // namespace rext::cuda
