// The two inner loops of the fused top-k affinity, chosen at run time for this CPU:
//   micro: C[MR x NR] (+)= A_panel . B_panel over kc steps (packed panels, see affinity_cpu.cpp)
//   scan:  merge one row of a similarity tile into that row's running top-k
//   col_scan: merge every column of a tile into the running top-k of the row that column
//          stands for (the transposed half of a symmetric tile)
// Candidates may arrive out of index order, so both scans apply the full tie rule of
// core/topk.h (their vector filters let equal values through).
// simd_avx2.cpp holds the AVX2/FMA versions, simd_generic.cpp the portable ones.
#pragma once
#include <cstdint>

namespace rext::cpu {

template <class T>
struct TileKernels {
  int mr = 0, nr = 0;
  const char* name = "";
  // c is row-major with leading dimension ldc; accumulate=false overwrites it.
  void (*micro)(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, bool accumulate) = nullptr;
  // Candidates s[0..n) sit at columns j0..j0+n-1; column self_j (or none if -1) is skipped.
  void (*scan)(const T* s, int64_t n, int64_t j0, int64_t self_j, T* vals, int64_t* idx,
               int64_t k) = nullptr;
  // Tile rows are rows i0..i0+nrows-1 of X; column c updates the list vals/idx + c*k, whose
  // current k-th value is cached in thr[c].
  void (*col_scan)(const T* tile, int64_t nrows, int64_t ncols, int64_t ldc, int64_t i0, T* vals,
                   int64_t* idx, T* thr, int64_t k) = nullptr;
};

template <class T> TileKernels<T> generic_kernels();
template <class T> TileKernels<T> avx2_kernels();

// AVX2 when the CPU has it and REXT_SIMD is not "generic"; the portable kernels otherwise.
template <class T> TileKernels<T> best_kernels();

const char* simd_level();

}  // namespace rext::cpu
