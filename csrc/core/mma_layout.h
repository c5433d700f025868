// Which shared-memory row and 16-byte column each lane names in the tensor-core tile loop, and
// which accumulator entries it then holds. The CUDA kernel uses these, and the CPU self-test
// (_selftest_mma_layout) checks them against the PTX ISA's fragment layouts, so the mapping is
// tested where no GPU is.
//
// The loop (affinity_cuda.cu) keeps operands row-major in shared memory, K contiguous: the A
// rows (queries) and the B rows (database rows, i.e. the columns of S). Per K step of 32 bytes
// (16 bf16 or 8 tf32 values) a warp issues, per 16-row block:
//   A: ldmatrix.x4 -> a0..a3 of one m16 x k fragment of mma.sync m16n8k16.bf16 / m16n8k8.tf32
//      (matrices: rows 0-7 / 8-15 of the first 16 bytes, then of the second 16 bytes);
//   B: ldmatrix.x4 -> b0, b1 of the n8 block of rows 0-7, then b0, b1 of rows 8-15 (matrices:
//      rows 0-7 first / second 16 bytes, rows 8-15 first / second 16 bytes).
// ldmatrix hands lane t the 4 bytes at row t / 4, bytes 4 (t % 4) of each 8 x 16-byte matrix
// whose row addresses lanes 8i .. 8i + 7 supply. For 4-byte tf32 values that is one value per
// register, which is the tf32 fragment layout as well.
#pragma once

#include "core/views.h"

namespace rext {

struct MmaLaneAddress {
  int row;        // row within the 16-row block
  int col_bytes;  // byte offset within the 32-byte K step: 0 or 16
};

// The address lane `lane` supplies to the A operand's ldmatrix.x4.
REXT_HD MmaLaneAddress mma_a_address(int lane) {
  return {(lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 16};
}

// The address lane `lane` supplies to the B operand's ldmatrix.x4.
REXT_HD MmaLaneAddress mma_b_address(int lane) {
  return {(lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 16};
}

// Accumulator entry e (0..3) of an m16 x n8 tile held by lane `lane`: its row and column.
REXT_HD int mma_acc_row(int lane, int e) { return (lane >> 2) + (e >> 1) * 8; }
REXT_HD int mma_acc_col(int lane, int e) { return (lane & 3) * 2 + (e & 1); }

}  // namespace rext
