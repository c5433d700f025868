#pragma once
#include "core/params.h"
#include "core/views.h"

namespace rext::cuda {

// See cpu/affinity_cpu.h: the same query rows (all of x, a row range of x or `*queries`).
template <class T>
void knn_affinity_cuda(Device dev, const StackedRows<T>& x, const StackedRows<T>* queries,
                       MatrixView<int64_t> indices, MatrixView<T> weights,
                       const AffinityParams& p);

}  // namespace rext::cuda
