#pragma once
#include "core/params.h"
#include "core/views.h"

namespace rext::cpu {

// Fused tiled similarity + running per-row top-k (docs/mathematics.md §2, steps 1-3) for rows of x.
// The query rows are `*queries` when given (never excluded from their own lists: they are not
// rows of x), else rows [p.query_start, p.query_stop) of x. indices/weights: (queries, k),
// column indices global rows of x, written sorted by similarity (descending, ties: smaller
// index). Arguments are checked by the dispatcher.
template <class T>
void knn_affinity_cpu(const StackedRows<T>& x, const StackedRows<T>* queries,
                      MatrixView<int64_t> indices, MatrixView<T> weights,
                      const AffinityParams& p);

}  // namespace rext::cpu
