#pragma once
#include "core/params.h"
#include "core/views.h"

namespace rext::cuda {

template <class T>
int64_t sym_normalize_cuda(Device dev, MatrixView<const int64_t> indices,
                           MatrixView<const T> weights, int64_t* out_indptr, int64_t* out_indices,
                           T* out_data, const NormalizeParams& p);

}  // namespace rext::cuda
