#pragma once
#include "core/params.h"
#include "core/views.h"

namespace rext::cpu {

// W = D^-1/2 (A + A^T) D^-1/2 in CSR, A given as a k-NN list (indices, weights), both (N, k).
// Writes at most 2 N k entries into out_indices / out_data (sorted columns, duplicates merged,
// zero entries dropped) and N + 1 row pointers; returns nnz.
template <class T>
int64_t sym_normalize_cpu(MatrixView<const int64_t> indices, MatrixView<const T> weights,
                          int64_t* out_indptr, int64_t* out_indices, T* out_data,
                          const NormalizeParams& p);

}  // namespace rext::cpu
