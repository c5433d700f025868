// The device switch for each op: CPU kernels always, CUDA kernels when compiled in.
#pragma once
#include "core/params.h"
#include "core/views.h"

namespace rext {

template <class T>
void knn_affinity(Device dev, const StackedRows<T>& x, MatrixView<int64_t> indices,
                  MatrixView<T> weights, const AffinityParams& p);

template <class T>
int64_t sym_normalize(Device dev, MatrixView<const int64_t> indices, MatrixView<const T> weights,
                      int64_t* out_indptr, int64_t* out_indices, T* out_data,
                      const NormalizeParams& p);

template <class T>
void cg_solve(Device dev, const CsrView<T>& w, MatrixView<const T> rhs, MatrixView<T> x,
              int64_t* iterations, double* residuals, const CgParams& p);

bool built_with_cuda();
int cuda_device_count();  // 0 without CUDA, without a driver or without a device
const char* simd_level();

}  // namespace rext
