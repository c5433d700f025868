#pragma once
#include "core/params.h"
#include "core/views.h"

namespace rext::cuda {

template <class T>
int64_t sym_normalize_cuda(Device dev, MatrixView<const int64_t> indices,
                           MatrixView<const T> weights, int64_t* out_indptr, int64_t* out_indices,
                           T* out_data, const NormalizeParams& p);

// Workspace for n x k inputs: sort buffers plus CUB's temporary storage, whose size CUB
// reports for the given device (so this needs a CUDA device).
int64_t sym_normalize_workspace_bytes_cuda(Device dev, int64_t n, int64_t k, bool dbl);

}  // namespace rext::cuda
