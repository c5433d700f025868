// Byte layouts of the caller-allocated CUDA workspaces. Plain arithmetic, compiled into every
// build, so reclip_ext/ops.py can size the buffer (through _core.*_workspace_bytes) with the very
// numbers the kernels carve it with; the CPU tests check them on machines without a GPU.
#pragma once
#include <cstdint>

#include "core/params.h"

namespace rext {

constexpr int64_t kWorkspaceAlign = 256;

inline int64_t round_up_to(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Hands out consecutive 256-byte aligned byte ranges of one buffer.
struct Carve {
  int64_t offset = 0;
  int64_t take(int64_t bytes) {
    const int64_t at = offset;
    offset = round_up_to(offset + (bytes > 0 ? bytes : 0), kWorkspaceAlign);
    return at;
  }
};

// knn_affinity: the packed operand copy of X (rows padded to the tile, plus one tile of slack
// so that tiles starting at any row stay in bounds; depth padded to the 32-deep K step, zero
// filled), the per-row scale (1/||x_i|| or 1), and the final k-lists (similarity, int32 column)
// of the nq query rows (nq < 0: all n rows). Separate queries (not rows of X) get a packed copy
// and scales of their own (xq, q_scale); query rows of X use X's.
struct AffinityLayout {
  int64_t n_pad = 0, d_pad = 0, nq = 0, nq_pad = 0;
  int64_t op_bytes = 0, acc_bytes = 0;
  int64_t xp = 0, scale = 0, xq = 0, q_scale = 0, cand_v = 0, cand_i = 0, total = 0;
  // Two 64-bit slots the kernels raise with atomicMax and the host reads back: the largest
  // row norm (checked when not normalising) and the largest similarity whose weight
  // overflowed; both are non-negative doubles, which order like their bit patterns.
  int64_t guard = 0;
};

inline AffinityLayout affinity_layout(int64_t n, int64_t d, int64_t k, int64_t elem_bytes,
                                      Precision prec, int64_t nq = -1, bool separate = false) {
  AffinityLayout l;
  l.n_pad = round_up_to(n, 128) + 128;
  l.d_pad = round_up_to(d, 32);
  l.nq = nq < 0 ? n : nq;
  l.nq_pad = separate ? round_up_to(l.nq, 128) + 128 : 0;
  l.op_bytes = elem_bytes == 8 ? 8 : (prec == Precision::Bf16 ? 2 : 4);
  l.acc_bytes = elem_bytes == 8 ? 8 : 4;
  Carve c;
  l.xp = c.take(l.n_pad * l.d_pad * l.op_bytes);
  l.scale = c.take(n * elem_bytes);
  l.xq = c.take(l.nq_pad * l.d_pad * l.op_bytes);
  l.q_scale = c.take(separate ? l.nq * elem_bytes : 0);
  l.cand_v = c.take(l.nq * k * l.acc_bytes);
  l.cand_i = c.take(l.nq * k * 4);
  l.guard = c.take(2 * 8);
  l.total = c.offset;
  return l;
}

// cg_solve: residual R, direction P and product Q (N x m each, row-major, leading dim m), the
// per-column double scalars (rs, rs_new, pAp, pp, ||b||, step, beta, scale), the active flags
// and two ints read back once per iteration: the count of active columns and the first broken
// column + 1 (0: none).
struct CgLayout {
  int64_t r = 0, p = 0, q = 0, rs = 0, rs_new = 0, pq = 0, pp = 0, bnorm = 0, step = 0,
          beta = 0, scale = 0, active = 0, count = 0, total = 0;
};

inline CgLayout cg_layout(int64_t n, int64_t m, int64_t elem_bytes) {
  CgLayout l;
  Carve c;
  l.r = c.take(n * m * elem_bytes);
  l.p = c.take(n * m * elem_bytes);
  l.q = c.take(n * m * elem_bytes);
  l.rs = c.take(m * 8);
  l.rs_new = c.take(m * 8);
  l.pq = c.take(m * 8);
  l.pp = c.take(m * 8);
  l.bnorm = c.take(m * 8);
  l.step = c.take(m * 8);
  l.beta = c.take(m * 8);
  l.scale = c.take(m * 8);
  l.active = c.take(m * 4);
  l.count = c.take(8);
  l.total = c.offset;
  return l;
}

}  // namespace rext
