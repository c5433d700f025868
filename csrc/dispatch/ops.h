// The device switch for each op: CPU kernels always, CUDA kernels when compiled in.
#pragma once
#include <string>
#include <vector>

#include "core/params.h"
#include "core/views.h"

namespace rext {

// The graph's rows for the query rows (all of x, rows [p.query_start, p.query_stop) of x, or
// `*queries` when not null) against every row of x; indices are global rows of x.
template <class T>
void knn_affinity(Device dev, const StackedRows<T>& x, const StackedRows<T>* queries,
                  MatrixView<int64_t> indices, MatrixView<T> weights, const AffinityParams& p);

template <class T>
int64_t sym_normalize(Device dev, MatrixView<const int64_t> indices, MatrixView<const T> weights,
                      int64_t* out_indptr, int64_t* out_indices, T* out_data,
                      const NormalizeParams& p);

template <class T>
void cg_solve(Device dev, const CsrView<T>& w, MatrixView<const T> rhs, MatrixView<T> x,
              int64_t* iterations, double* residuals, const CgParams& p);

// Bytes of the caller-allocated workspace each CUDA op needs (dbl: float64 data). The
// affinity and CG sizes are plain arithmetic (core/workspace_layout.h) and work in every build;
// the normalisation adds CUB's temporary storage, which CUB sizes for a given device, so it
// needs a CUDA build and device.
// knn_affinity: nq query rows (-1: all n), `separate` when they are not rows of x.
int64_t knn_affinity_workspace_bytes(int64_t n, int64_t d, int64_t k, bool dbl, Precision prec,
                                     int64_t nq = -1, bool separate = false);
int64_t sym_normalize_workspace_bytes(Device dev, int64_t n, int64_t k, bool dbl);
int64_t cg_solve_workspace_bytes(int64_t n, int64_t m, bool dbl);

bool built_with_cuda();
bool built_with_cusparse();  // the CG's spmm='cusparse' path is compiled in
// Opens cuSPARSE for that path (once per process; `candidates` are extra paths to try after
// the soname) and returns what it opened; std::runtime_error when it cannot, or in a build
// without the path.
std::string load_cusparse(const std::vector<std::string>& candidates);
int cuda_device_count();  // 0 without CUDA, without a driver or without a device
const char* simd_level();

}  // namespace rext
