#pragma once
#include "core/params.h"
#include "core/views.h"

namespace rext::cuda {

template <class T>
void knn_affinity_cuda(Device dev, const StackedRows<T>& x, MatrixView<int64_t> indices,
                       MatrixView<T> weights, const AffinityParams& p);

}  // namespace rext::cuda
