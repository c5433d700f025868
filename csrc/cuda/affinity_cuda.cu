// Fused top-k affinity on the GPU. S = X X^T is never stored: each CTA owns a block of rows,
// walks over every column tile, computes the tile into shared memory and merges it into its
// rows' running top-k lists before the next tile.
//
// 1. pack_rows: X (two strided row blocks: text then images) -> a zero-padded, aligned copy in
//    the workspace in the operand type (fp32 / fp64 / bf16 / fp32 rounded to tf32), rows scaled
//    by 1/||x_i|| when normalising (the same scaling the CPU packs with). Any input stride and
//    alignment is handled here, so the main kernel issues only aligned 16-byte cp.async loads.
// 2. topk_tiles: per CTA a BM-row block; per column tile a BM x BN product over 32-deep K
//    steps, pipelined through shared memory with cp.async (3 stages for bf16, 2 for fp32 /
//    fp64; one barrier per K step; each thread's copy addresses only advance); CUDA-core FMA
//    tiles for "exact" (fp32 / fp64), tensor-core tiles for bf16 and tf32 (ldmatrix operands,
//    mma.sync m16n8k16 / m16n8k8, fp32 accumulation; lane roles in core/mma_layout.h). The
//    finished tile goes to shared memory; each warp then scans its rows: candidates are
//    filtered against the row's current k-th entry with a warp ballot, and only the survivors
//    (after the first tiles, very few) are inserted into the sorted list by a warp-cooperative
//    shift. Lists live in shared memory for k <= 64 and in
//    the global workspace above that (same code, slower).
// 3. finalize: for bf16 / tf32 the k neighbours are re-scored in fp32 from the original rows
//    and re-sorted (so weights are exact dot products; the neighbour set may differ slightly
//    from fp32); then f(s) is applied and int64 indices written. Tie rule: core/topk.h.
//
// A query block (the graph's rows for some queries only) changes only which operand rows the
// CTAs own: rows [q0, q0 + nq) of the packed X (an offset into it, no copy), or a second packed
// copy for separate query rows. The column walk, the products (each entry the same ordered FMA
// chain wherever its tile sits) and the lists are those of the whole graph, so in "exact"
// precision a block's rows are the whole graph's rows.
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

// cp.async, ldmatrix, and mma.sync on bf16 / tf32 all need sm_80 or newer.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "reclip_ext's CUDA kernels need sm_80 or newer (set CMAKE_CUDA_ARCHITECTURES)"
#endif

#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "core/check.h"
#include "core/graph_math.h"
#include "core/mma_layout.h"
#include "core/topk.h"
#include "core/workspace_layout.h"
#include "cuda/affinity_cuda.h"
#include "cuda/common.cuh"

namespace rext::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kBK = 32;        // K step per pipeline stage
constexpr int kListCap = 64;   // longest list kept in shared memory

enum class Mma { Simt, Bf16, Tf32 };

// Tile shape per operand kind. Simt: a 16 x 16 thread grid, thread (ty, tx) owns rows
// ty + 16 m and columns tx + 16 n (strided, so shared-memory reads hit distinct banks).
// Tensor cores: 4 x 2 warps, each a 32 x 64 block of 2 x 8 m16n8 accumulators.
template <class Op, class Acc, Mma M>
struct Cfg {
  static constexpr int BM = sizeof(Acc) == 8 ? 64 : 128;
  static constexpr int BN = BM;
  static constexpr int TM = BM / 16, TN = BN / 16;
  static constexpr int PAD = 16 / int(sizeof(Op));    // keeps rows 16-byte aligned
  static constexpr int LDA = kBK + PAD;                // operand row pitch (elements)
  // S tile row pitch, chosen for conflict-free stores of the accumulators: a Simt warp's two
  // rows land half a bank row apart with 16 extra floats; a tensor-core warp's 8-byte stores
  // cover eight rows, a quarter apart with 8.
  static constexpr int LDS = BN + (sizeof(Acc) == 8 || M != Mma::Simt ? 8 : 16);
  static constexpr int kStageElems = (BM + BN) * LDA;
  // cp.async pipeline depth: bf16 stages are small enough for three inside the S tile's
  // footprint; fp32 / fp64 stages take two (a third would cost shared memory, hence occupancy).
  static constexpr int kStages = sizeof(Op) == 2 ? 3 : 2;
  static constexpr int kStagesBytes = kStages * kStageElems * int(sizeof(Op));
  static constexpr int kTileBytes = BM * LDS * int(sizeof(Acc));
  static constexpr int kRegion0 =
      ((kStagesBytes > kTileBytes ? kStagesBytes : kTileBytes) + 127) / 128 * 128;
  // Dynamic shared memory: operands / S tile (aliased), then lists (if in shared memory),
  // then per-row thresholds.
  static int64_t smem_bytes(int kcap, bool global_lists) {
    int64_t b = kRegion0;
    if (!global_lists) b += int64_t(BM) * kcap * (sizeof(Acc) + 4);
    b += int64_t(BM) * (sizeof(Acc) + 4);
    return b;
  }
};

template <class Acc>
struct KernelArgs {
  const void* xp;       // packed database operands, n_pad x d_pad
  const void* xq;       // packed query operands: row 0 is query 0 (may point into xp)
  int64_t d_pad;
  int64_t n;            // database rows (columns of S)
  int64_t nq;           // query rows (rows of S computed here)
  int64_t self0;        // column of query 0's own row when it is excluded, else -1
  int k;
  int kcap;             // list pitch in shared memory (32 or 64)
  int eff_rows;         // rows per CTA actually owned (block_rows forces fewer)
  int eff_cols;         // columns per tile actually consumed
  bool global_lists;
  Acc* cand_v;          // nq x k
  int* cand_i;          // nq x k
};

// Convert one input value to the operand type.
template <class Op>
__device__ __forceinline__ Op to_operand(float v, bool tf32);
template <>
__device__ __forceinline__ float to_operand<float>(float v, bool tf32) {
  // Rounded to tf32 here, once, so the tensor-core fragments need no per-element conversion.
  if (!tf32) return v;
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(v));
  return __uint_as_float(bits);
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_operand<__nv_bfloat16>(float v, bool) {
  return __float2bfloat16_rn(v);
}
template <class Op>
__device__ __forceinline__ Op to_operand(double v, bool) {
  return Op(v);
}

// One warp per packed row (rows past n are zero). Scale = 1 / ||x_i|| computed in double,
// scaled by the largest entry first as on the CPU.
template <class T, class Op>
__global__ void pack_rows(StackedRows<T> x, bool normalize, bool tf32, T* scale, Op* xp,
                          int64_t n, int64_t n_pad, int64_t d, int64_t d_pad,
                          double norm_limit, unsigned long long* largest_norm) {
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (i >= n_pad) return;
  T s = T(1);
  const T* row = i < n ? x.row(i) : nullptr;
  if (row) {
    // The norm in double, after dividing by the largest entry: neither a huge nor a tiny row
    // over- or underflows on the way (the CPU kernel computes it the same way).
    double big = 0;
    for (int64_t c = lane; c < d; c += 32) big = ::fmax(big, ::fabs(double(row[c])));
    big = warp_max(big);
    double ss = 0;
    if (big > 0)
      for (int64_t c = lane; c < d; c += 32) {
        const double q = double(row[c]) / big;
        ss += q * q;
      }
    ss = warp_sum(ss);
    if (normalize) {
      // A zero row is refused by ops.py; a zero scale keeps it harmless if one slips through.
      s = big > 0 ? T(1.0 / (big * ::sqrt(ss))) : T(0);
    } else if (lane == 0 && big * ::sqrt(ss) > norm_limit) {
      // only rows over the limit raise the guard: ordinary input costs no contended atomics,
      // and the largest offending norm is still the largest norm
      atomicMax(largest_norm, static_cast<unsigned long long>(__double_as_longlong(big * ::sqrt(ss))));
    }
  }
  if (row && lane == 0) scale[i] = s;
  Op* dst = xp + i * d_pad;
  for (int64_t c = lane; c < d_pad; c += 32)
    dst[c] = to_operand<Op>(row && c < d ? row[c] * s : T(0), tf32);
}

// The cp.async copies of the K steps. A stage is BM A rows then BN B rows of kBK operands,
// kPerRow 16-byte pieces per row; thread t always copies piece t % kPerRow of rows
// t / kPerRow + i kRowStep, so its sources advance by kBK per K step and by kRowStep rows per
// copy: two pointer additions per copy, nothing recomputed from the row index.
template <class C, class Op>
struct StageCopies {
  static constexpr int kVec = 16 / int(sizeof(Op));
  static constexpr int kPerRow = kBK / kVec;
  static constexpr int kRowStep = kThreads / kPerRow;
  static constexpr int kCopies = (C::BM + C::BN) / kRowStep;
  static_assert(kThreads % kPerRow == 0 && C::BM % kRowStep == 0 && C::BN % kRowStep == 0,
                "every copy reads A or B rows only, never both");
  const Op* a_src;      // this thread's first A piece of the next K step
  const Op* b_src;      // this thread's first B piece of the next K step
  int64_t row_step;     // kRowStep rows of the packed operands, in elements
  uint32_t dst;         // this thread's first piece in a stage (shared-memory address)

  __device__ StageCopies(const Op* a_rows, const Op* b_rows, int64_t d_pad, const Op* stages) {
    const int r = threadIdx.x / kPerRow, piece = threadIdx.x % kPerRow;
    a_src = a_rows + r * d_pad + piece * kVec;
    b_src = b_rows + r * d_pad + piece * kVec;
    row_step = kRowStep * d_pad;
    dst = uint32_t(__cvta_generic_to_shared(stages + r * C::LDA + piece * kVec));
  }

  // Issues the copies of the next K step into the stage at byte offset `stage` and moves on.
  __device__ __forceinline__ void issue(uint32_t stage) {
    const Op* src = a_src;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      if (i * kRowStep == C::BM) src = b_src;
      const uint32_t to = dst + stage + uint32_t(i * kRowStep * C::LDA * int(sizeof(Op)));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(src)
                   : "memory");
      src += row_step;
    }
    a_src += kBK;
    b_src += kBK;
  }
};

// Tensor-core operands and products as PTX: the wmma API loads fragments through generic
// addresses (no ldmatrix) and fixes the accumulator shape; core/mma_layout.h has the lane roles.
// Volatile, with its memory operand hidden from the compiler: it must not move across the
// barriers that publish the cp.async copies.
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <Mma M>
__device__ __forceinline__ void mma_16x8(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  // Not volatile: a pure function of registers, which the compiler may schedule freely.
  if constexpr (M == Mma::Bf16)
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// S tile (BM x BN, pitch LDS) of query rows [row0, ...) of xa against rows [col0, ...) of xb
// into `tile`.
template <class C, class Op, class Acc, Mma M>
__device__ void compute_tile(Op* stages, Acc* tile, const Op* xa, const Op* xb, int64_t d_pad,
                             int64_t row0, int64_t col0) {
  const int steps = int(d_pad / kBK);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  [[maybe_unused]] Acc acc[M == Mma::Simt ? C::TM : 1][M == Mma::Simt ? C::TN : 1];
  // Tensor cores: a warp's 32 x 64 block is 2 x 8 m16n8 accumulators of 4 floats.
  [[maybe_unused]] float macc[M == Mma::Simt ? 1 : 2][M == Mma::Simt ? 1 : 8][4];
  if constexpr (M == Mma::Simt) {
#pragma unroll
    for (int a = 0; a < C::TM; ++a)
#pragma unroll
      for (int b = 0; b < C::TN; ++b) acc[a][b] = Acc(0);
  } else {
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) macc[a][b][e] = 0.0f;
  }

  // Pipeline: group g holds K step g in stage g % S. Before step s, S - 1 + s groups have
  // been committed (empty ones past the last step keep the count uniform), so waiting until
  // at most S - 2 are pending means group s has landed. The barrier then also guarantees that
  // every warp has finished step s - 1, whose stage the next copy overwrites.
  constexpr int S = C::kStages;
  constexpr uint32_t kStageBytes = uint32_t(C::kStageElems * sizeof(Op));
  // Layout invariants the copies and fragments rely on (checked here, where they are used):
  // 16-byte cp.async destinations and ldmatrix rows; the warp grids cover the tile exactly;
  // a K step is whole 32-byte mma chunks; the stages fit the region the S tile reuses.
  static_assert(C::LDA * sizeof(Op) % 16 == 0 && C::kStageElems * sizeof(Op) % 128 == 0);
  static_assert(C::kStagesBytes <= C::kRegion0 && C::kTileBytes <= C::kRegion0);
  static_assert(S >= 2 && kBK % (16 / sizeof(Op)) == 0);
  if constexpr (M == Mma::Simt) {
    static_assert(C::BM == 16 * C::TM && C::BN == 16 * C::TN && kThreads == 256);
  } else {
    static_assert(C::BM == 4 * 32 && C::BN == 2 * 64 && kWarps == 8 && sizeof(Acc) == 4);
    static_assert(kBK * sizeof(Op) % 32 == 0 && C::LDS % 2 == 0);
  }
  StageCopies<C, Op> copies(xa + row0 * d_pad, xb + col0 * d_pad, d_pad, stages);
  const uint32_t stages_at = uint32_t(__cvta_generic_to_shared(stages));
#pragma unroll
  for (int g = 0; g < S - 1; ++g) {
    if (g < steps) copies.issue(g * kStageBytes);
    __pipeline_commit();
  }
  // This lane's ldmatrix addresses within a stage (tensor cores only).
  [[maybe_unused]] uint32_t a_at = 0, b_at = 0;
  if constexpr (M != Mma::Simt) {
    const int wm = warp >> 1, wn = warp & 1;
    const MmaLaneAddress a = mma_a_address(lane), b = mma_b_address(lane);
    a_at = stages_at + uint32_t(((wm * 32 + a.row) * C::LDA) * sizeof(Op) + a.col_bytes);
    b_at = stages_at +
           uint32_t(((C::BM + wn * 64 + b.row) * C::LDA) * sizeof(Op) + b.col_bytes);
  }
  for (int s = 0; s < steps; ++s) {
    // The wait is no compiler barrier for plain shared loads (the FMA tiles'); the
    // __syncthreads() right after it is, so the two stay together.
    __pipeline_wait_prior(S - 2);
    __syncthreads();
    const int next = s + S - 1;
    if (next < steps) copies.issue((next % S) * kStageBytes);
    __pipeline_commit();
    if constexpr (M == Mma::Simt) {
      const Op* As = stages + (s % S) * C::kStageElems;
      const Op* Bs = As + C::BM * C::LDA;
      const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll 4
      for (int kk = 0; kk < kBK; ++kk) {
        Acc a[C::TM], b[C::TN];
#pragma unroll
        for (int m = 0; m < C::TM; ++m) a[m] = As[(ty + 16 * m) * C::LDA + kk];
#pragma unroll
        for (int q = 0; q < C::TN; ++q) b[q] = Bs[(tx + 16 * q) * C::LDA + kk];
#pragma unroll
        for (int m = 0; m < C::TM; ++m)
#pragma unroll
          for (int q = 0; q < C::TN; ++q) acc[m][q] = fma(a[m], b[q], acc[m][q]);
      }
    } else {
      const uint32_t stage = (s % S) * kStageBytes;
      constexpr uint32_t kBlockBytes = 16 * C::LDA * sizeof(Op);  // 16 operand rows
#pragma unroll 2
      for (int chunk = 0; chunk < int(kBK * sizeof(Op)) / 32; ++chunk) {
        uint32_t fa[2][4];
#pragma unroll
        for (int a = 0; a < 2; ++a) ldmatrix_x4(a_at + stage + a * kBlockBytes + chunk * 32, fa[a]);
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          uint32_t fb[4];  // b0, b1 of the n8 block of rows 16b .. 16b + 7, then of 16b + 8 ..
          ldmatrix_x4(b_at + stage + b * kBlockBytes + chunk * 32, fb);
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            mma_16x8<M>(macc[a][2 * b], fa[a], fb[0], fb[1]);
            mma_16x8<M>(macc[a][2 * b + 1], fa[a], fb[2], fb[3]);
          }
        }
      }
    }
  }
  __pipeline_wait_prior(0);  // only empty groups remain; keeps the accounting explicit
  __syncthreads();           // every warp is done with the stages: S reuses their memory

  // The operand stages are dead: S reuses their shared memory.
  if constexpr (M == Mma::Simt) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int m = 0; m < C::TM; ++m)
#pragma unroll
      for (int q = 0; q < C::TN; ++q) tile[(ty + 16 * m) * C::LDS + tx + 16 * q] = acc[m][q];
  } else {
    const int wm = warp >> 1, wn = warp & 1;
    // Entries 0, 1 (and 2, 3) of an accumulator are adjacent columns: one 8-byte store each.
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
          const int row = wm * 32 + a * 16 + mma_acc_row(lane, e);
          const int col = wn * 64 + b * 8 + mma_acc_col(lane, e);
          *reinterpret_cast<float2*>(tile + row * C::LDS + col) =
              make_float2(macc[a][b][e], macc[a][b][e + 1]);
        }
  }
  __syncthreads();
}

// Warp-cooperative insert of (s, j) into the sorted list (lv, li) of length k; the caller
// guarantees that (s, j) beats the last entry. The rank is the number of entries ahead of
// the candidate (a prefix of the sorted list); entries from the rank on shift down by one,
// chunk by chunk from the end (each chunk read completely before it is written).
template <class Acc>
__device__ void warp_insert(Acc* lv, int* li, int k, Acc s, int j, int lane) {
  int rank = 0;
  for (int base = 0; base < k; base += 32) {
    const int e = base + lane;
    const bool ahead = e < k && topk_before(lv[e], topk_slot(li[e]), s, int64_t(j));
    rank += __popc(__ballot_sync(kFullMask, ahead));
  }
  for (int base = (k - 1) / 32 * 32; base >= 0 && base + 31 >= rank; base -= 32) {
    const int e = base + lane;
    const bool move = e >= rank && e <= k - 2;
    Acc v{};
    int ix = 0;
    if (move) {
      v = lv[e];
      ix = li[e];
    }
    __syncwarp();
    if (move) {
      lv[e + 1] = v;
      li[e + 1] = ix;
    }
    __syncwarp();
  }
  if (lane == 0) {
    lv[rank] = s;
    li[rank] = j;
  }
  __syncwarp();
}

// Tensor-core tiles are register-capped for two CTAs per SM (with k <= 32 their shared memory
// fits twice on sm_90), so one CTA's top-k epilogue overlaps the other's products; the FMA
// tiles need their registers (capped, they spill in the inner loop) and run one CTA per SM.
template <Mma M>
constexpr int kMinBlocks = M == Mma::Simt ? 1 : 2;

template <class Op, class Acc, Mma M>
__global__ void __launch_bounds__(kThreads, kMinBlocks<M>) topk_tiles(KernelArgs<Acc> args) {
  using C = Cfg<Op, Acc, M>;
  extern __shared__ __align__(128) unsigned char smem[];
  Op* stages = reinterpret_cast<Op*>(smem);
  Acc* tile = reinterpret_cast<Acc*>(smem);
  unsigned char* after = smem + C::kRegion0;
  Acc* list_v = nullptr;
  int* list_i = nullptr;
  if (!args.global_lists) {
    list_v = reinterpret_cast<Acc*>(after);
    after += sizeof(Acc) * C::BM * args.kcap;
    list_i = reinterpret_cast<int*>(after);
    after += sizeof(int) * C::BM * args.kcap;
  }
  Acc* thr_v = reinterpret_cast<Acc*>(after);
  int* thr_i = reinterpret_cast<int*>(after + sizeof(Acc) * C::BM);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = args.n, nq = args.nq, i0 = int64_t(blockIdx.x) * args.eff_rows;
  const int k = args.k;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  auto row_list = [&](int r, Acc*& lv, int*& li) {
    if (args.global_lists) {
      lv = args.cand_v + (i0 + r) * int64_t(k);
      li = args.cand_i + (i0 + r) * int64_t(k);
    } else {
      lv = list_v + r * args.kcap;
      li = list_i + r * args.kcap;
    }
  };

  // Each warp owns rows warp, warp + 8, ...: their lists and thresholds are only ever touched
  // by that warp, so no block-level synchronisation protects them.
  for (int r = warp; r < args.eff_rows && i0 + r < nq; r += kWarps) {
    Acc* lv;
    int* li;
    row_list(r, lv, li);
    for (int e = lane; e < k; e += 32) {
      lv[e] = neg_inf;
      li[e] = -1;
    }
    if (lane == 0) {
      thr_v[r] = neg_inf;
      thr_i[r] = -1;
    }
  }
  __syncwarp();

  const Op* xp = static_cast<const Op*>(args.xp);
  const Op* xq = static_cast<const Op*>(args.xq);
  for (int64_t j0 = 0; j0 < n; j0 += args.eff_cols) {
    compute_tile<C, Op, Acc, M>(stages, tile, xq, xp, args.d_pad, i0, j0);
    for (int r = warp; r < args.eff_rows && i0 + r < nq; r += kWarps) {
      const int64_t i = i0 + r;
      Acc* lv;
      int* li;
      row_list(r, lv, li);
      Acc tv = thr_v[r];
      int ti = thr_i[r];
      for (int c0 = 0; c0 < args.eff_cols; c0 += 32) {
        const int c = c0 + lane;
        const int64_t j = j0 + c;
        const bool ok = c < args.eff_cols && j < n && !(args.self0 >= 0 && j == args.self0 + i);
        const Acc s = ok ? tile[r * C::LDS + c] : Acc(0);
        unsigned mask = __ballot_sync(kFullMask, ok && topk_beats_slot(s, j, tv, int64_t(ti)));
        while (mask) {
          const int src = __ffs(mask) - 1;
          const Acc cs = __shfl_sync(kFullMask, s, src);
          const int cj = __shfl_sync(kFullMask, int(j), src);
          warp_insert(lv, li, k, cs, cj, lane);
          tv = lv[k - 1];
          ti = li[k - 1];
          mask &= ~(1u << src);
          // The threshold rose: drop the lanes it now rejects.
          mask &= __ballot_sync(kFullMask, ok && topk_beats_slot(s, j, tv, int64_t(ti)));
        }
      }
      // Every lane read thr_v/thr_i above; only ballots and shuffles came since, which do not
      // order shared-memory accesses, so lane 0 waits for the warp before overwriting them.
      __syncwarp();
      if (lane == 0) {
        thr_v[r] = tv;
        thr_i[r] = ti;
      }
    }
    __syncthreads();  // the next tile overwrites S
  }

  if (!args.global_lists) {
    for (int r = warp; r < args.eff_rows && i0 + r < nq; r += kWarps) {
      const Acc* lv = list_v + r * args.kcap;
      const int* li = list_i + r * args.kcap;
      for (int e = lane; e < k; e += 32) {
        args.cand_v[(i0 + r) * int64_t(k) + e] = lv[e];
        args.cand_i[(i0 + r) * int64_t(k) + e] = li[e];
      }
    }
  }
}

// One warp per query row: optional fp32 re-score of the k neighbours (then re-sort), weight,
// output. Query i is q.row(i) scaled by q_scale[i]; its neighbours are rows of x.
template <class T, class Acc>
__global__ void finalize(StackedRows<T> q, const T* q_scale, StackedRows<T> x, const T* scale,
                         Acc* cand_v, int* cand_i, int64_t nq, int64_t k, bool rescore,
                         Weight weight, double gamma, MatrixView<int64_t> out_i,
                         MatrixView<T> out_w, unsigned long long* overflowed) {
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (i >= nq) return;
  Acc* v = cand_v + i * k;
  int* id = cand_i + i * k;
  if (rescore) {
    const int64_t d = x.cols();
    const T* xi = q.row(i);
    const T si = q_scale[i];
    for (int64_t e = 0; e < k; ++e) {
      const int j = id[e];
      if (j < 0) continue;  // uniform across the warp
      const T* xj = x.row(j);
      const T sj = scale[j];
      Acc part = 0;
      // (x_i s_i) . (x_j s_j) with the same per-element scaling as the packed operands.
      for (int64_t c = lane; c < d; c += 32) part = fma(Acc(xi[c] * si), Acc(xj[c] * sj), part);
      part = warp_sum(part);
      if (lane == 0) v[e] = part;
    }
    __syncwarp();
    if (lane == 0) topk_sort(v, id, k);
    __syncwarp();
  }
  for (int64_t e = lane; e < k; e += 32) {
    out_i(i, e) = id[e];
    const T w = T(affinity_weight(double(v[e]), weight, gamma));
    out_w(i, e) = w;
    // Only a large positive similarity can overflow f(s) (its base is clamped at 0).
    if (!::isfinite(double(w)))
      atomicMax(overflowed, static_cast<unsigned long long>(__double_as_longlong(double(v[e]))));
  }
}

// Reads the two guard slots back (one small copy and a stream sync) and raises the shared
// host-side errors, so that CUDA and CPU refuse the same inputs with the same messages.
template <class T>
void check_guards(const unsigned long long* guard, cudaStream_t stream, double gamma) {
  unsigned long long host[2] = {0, 0};
  REXT_CUDA_CHECK(cudaMemcpyAsync(host, guard, sizeof host, cudaMemcpyDeviceToHost, stream));
  REXT_CUDA_CHECK(cudaStreamSynchronize(stream));
  double values[2];
  static_assert(sizeof(double) == sizeof(unsigned long long), "guard slots hold doubles");
  std::memcpy(values, host, sizeof values);
  check_similarity_norm(values[0], sizeof(T) == 8);
  check_weight(host[1] == 0, values[1], gamma, sizeof(T) == 8);
}

// Shared-memory attributes belong to the kernel on a device, not to a launch, and every host
// thread sees the same value. Setting them per call to the size that call needs would let a
// concurrent call with a smaller k lower the limit between another thread's set and its launch
// (which then fails). So they are set once per kernel and device, to the largest size any k
// needs (lists of kListCap in shared memory), under a lock; a launch only reads them.
template <class Op, class Acc, Mma M>
int prepare_tiles_kernel(int dev) {
  using C = Cfg<Op, Acc, M>;
  static std::mutex mutex;
  static std::vector<int> limit;  // per device: the dynamic shared memory allowed; 0 = not yet
  std::lock_guard<std::mutex> lock(mutex);
  if (dev >= int(limit.size())) limit.resize(dev + 1, 0);
  if (limit[dev] == 0) {
    int optin = 0;
    REXT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    const int64_t largest = C::smem_bytes(kListCap, false);
    const int allowed = int(largest < optin ? largest : optin);
    REXT_CUDA_CHECK(cudaFuncSetAttribute(topk_tiles<Op, Acc, M>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, allowed));
    // The tile lives in shared memory, not L1: ask for the largest carve-out so that two CTAs
    // fit where their registers allow it.
    REXT_CUDA_CHECK(cudaFuncSetAttribute(topk_tiles<Op, Acc, M>,
                                         cudaFuncAttributePreferredSharedMemoryCarveout,
                                         int(cudaSharedmemCarveoutMaxShared)));
    limit[dev] = allowed;
  }
  return limit[dev];
}

template <class Op, class Acc, Mma M>
void launch_tiles(const KernelArgs<Acc>& args, int64_t n, cudaStream_t stream) {
  using C = Cfg<Op, Acc, M>;
  const int64_t smem = C::smem_bytes(args.kcap, args.global_lists);
  int dev = 0;
  REXT_CUDA_CHECK(cudaGetDevice(&dev));
  const int allowed = prepare_tiles_kernel<Op, Acc, M>(dev);
  if (smem > allowed)
    throw std::runtime_error(detail::concat("knn_affinity: the tile needs ", smem,
                                            " bytes of shared memory, this device allows ",
                                            allowed));
  const unsigned grid = blocks_for(n, args.eff_rows);
  topk_tiles<Op, Acc, M><<<grid, kThreads, smem, stream>>>(args);
  REXT_CUDA_CHECK(cudaGetLastError());
}

// queries: separate query rows, or null for rows [q0, q0 + nq) of x.
template <class Op, class Acc, Mma M, class T>
void run(const StackedRows<T>& x, const StackedRows<T>* queries, int64_t q0, int64_t nq,
         MatrixView<int64_t> indices, MatrixView<T> weights, const AffinityParams& p,
         const AffinityLayout& l, char* ws, cudaStream_t stream) {
  using C = Cfg<Op, Acc, M>;
  const int64_t n = x.rows(), d = x.cols(), k = p.k;
  const double norm_limit = similarity_norm_limit(double(std::numeric_limits<T>::max()));
  T* scale = reinterpret_cast<T*>(ws + l.scale);
  Op* xp = reinterpret_cast<Op*>(ws + l.xp);
  auto* guard = reinterpret_cast<unsigned long long*>(ws + l.guard);
  REXT_CUDA_CHECK(cudaMemsetAsync(guard, 0, 2 * sizeof(unsigned long long), stream));
  pack_rows<T, Op><<<blocks_for(l.n_pad, kWarps), kThreads, 0, stream>>>(
      x, p.normalize, M == Mma::Tf32, scale, xp, n, l.n_pad, d, l.d_pad, norm_limit, guard);
  REXT_CUDA_CHECK(cudaGetLastError());
  // The query operands: an offset into the packed X for rows of X, a packing of their own
  // (same scaling, same guard) for separate queries.
  StackedRows<T> q = queries ? *queries : row_range(x, q0, q0 + nq);
  const T* q_scale = scale + q0;
  const Op* xq = xp + q0 * l.d_pad;
  if (queries) {
    T* own_scale = reinterpret_cast<T*>(ws + l.q_scale);
    Op* own = reinterpret_cast<Op*>(ws + l.xq);
    pack_rows<T, Op><<<blocks_for(l.nq_pad, kWarps), kThreads, 0, stream>>>(
        q, p.normalize, M == Mma::Tf32, own_scale, own, nq, l.nq_pad, d, l.d_pad, norm_limit,
        guard);
    REXT_CUDA_CHECK(cudaGetLastError());
    q_scale = own_scale;
    xq = own;
  }

  KernelArgs<Acc> a;
  a.xp = xp;
  a.xq = xq;
  a.d_pad = l.d_pad;
  a.n = n;
  a.nq = nq;
  a.self0 = !queries && p.exclude_self ? q0 : -1;
  a.k = int(k);
  a.global_lists = k > kListCap;
  a.kcap = k <= 32 ? 32 : kListCap;
  const int64_t forced = p.block_rows > 0 ? p.block_rows : C::BM;
  a.eff_rows = int(forced < C::BM ? forced : C::BM);
  a.eff_cols = int(forced < C::BN ? forced : C::BN);
  a.cand_v = reinterpret_cast<Acc*>(ws + l.cand_v);
  a.cand_i = reinterpret_cast<int*>(ws + l.cand_i);
  launch_tiles<Op, Acc, M>(a, nq, stream);

  finalize<T, Acc><<<blocks_for(nq, kWarps), kThreads, 0, stream>>>(
      q, q_scale, x, scale, a.cand_v, a.cand_i, nq, k, M != Mma::Simt, p.weight, p.gamma,
      indices, weights, guard + 1);
  REXT_CUDA_CHECK(cudaGetLastError());
  // Unit rows give similarities within rounding of [-1, 1]: |s| <= 1 + (d + 2) eps, whose
  // gamma-th power overflows only for an enormous gamma. Only then, or for unnormalised
  // input, does the call wait for the guards (one stream sync); the CPU checks always.
  const double eps = std::numeric_limits<T>::epsilon();
  const bool may_overflow = !p.normalize ||
      p.gamma * std::log1p(double(d + 2) * eps) >= std::log(double(std::numeric_limits<T>::max()));
  if (may_overflow) check_guards<T>(guard, stream, p.gamma);
}

}  // namespace

template <class T>
void knn_affinity_cuda(Device dev, const StackedRows<T>& x, const StackedRows<T>* queries,
                       MatrixView<int64_t> indices, MatrixView<T> weights,
                       const AffinityParams& p) {
  const int64_t n = x.rows(), d = x.cols(), k = p.k;
  REXT_CHECK(n < (int64_t(1) << 31) - 256, "x: the CUDA kernel takes fewer than 2^31 rows");
  const int64_t q0 = queries ? 0 : p.query_start;
  const int64_t nq = queries ? queries->rows() : (p.query_stop < 0 ? n : p.query_stop) - q0;
  REXT_CHECK(nq < (int64_t(1) << 31) - 256, "queries: the CUDA kernel takes fewer than 2^31 rows");
  constexpr bool dbl = sizeof(T) == 8;
  REXT_CHECK(!dbl || p.precision == Precision::Exact,
             "precision: 'tf32' and 'bf16' need float32 input; float64 runs 'exact'");
  DeviceGuard guard(dev.index);
  const AffinityLayout l =
      affinity_layout(n, d, k, sizeof(T), p.precision, nq, queries != nullptr);
  char* ws = workspace_base(p.workspace, l.total, "knn_affinity");
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  if constexpr (dbl) {
    run<double, double, Mma::Simt>(x, queries, q0, nq, indices, weights, p, l, ws, stream);
  } else {
    switch (p.precision) {
      case Precision::Exact: run<float, float, Mma::Simt>(x, queries, q0, nq, indices, weights, p, l, ws, stream); break;
      case Precision::Tf32: run<float, float, Mma::Tf32>(x, queries, q0, nq, indices, weights, p, l, ws, stream); break;
      case Precision::Bf16:
        run<__nv_bfloat16, float, Mma::Bf16>(x, queries, q0, nq, indices, weights, p, l, ws, stream);
        break;
    }
  }
}

template void knn_affinity_cuda<float>(Device, const StackedRows<float>&,
                                       const StackedRows<float>*, MatrixView<int64_t>,
                                       MatrixView<float>, const AffinityParams&);
template void knn_affinity_cuda<double>(Device, const StackedRows<double>&,
                                        const StackedRows<double>*, MatrixView<int64_t>,
                                        MatrixView<double>, const AffinityParams&);

}  // namespace rext::cuda
