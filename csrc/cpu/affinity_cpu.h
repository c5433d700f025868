#pragma once
#include "core/params.h"
#include "core/views.h"

namespace rext::cpu {

// Fused tiled similarity + running per-row top-k (docs/mathematics.md §2, steps 1-3) for rows of x.
// indices/weights: (N, k), written sorted by similarity (descending, ties: smaller index).
template <class T>
void knn_affinity_cpu(const StackedRows<T>& x, MatrixView<int64_t> indices, MatrixView<T> weights,
                      const AffinityParams& p);

}  // namespace rext::cpu
