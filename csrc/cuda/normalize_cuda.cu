// Symmetric normalisation W = D^-1/2 (A + A^T) D^-1/2 into CSR on the GPU, with the same
// semantics as normalize_cpu.cpp:
// 1. expand: every entry (i, j, w) of the k-NN lists becomes two COO entries keyed
//    i*N + j and j*N + i (A and A^T); zero weights get a sentinel key N*N that sorts last.
//    Out-of-range indices or bad weights set an error flag (read back at the end) instead of
//    faulting.
// 2. CUB radix sort of the 64-bit keys (only the bits N*N needs) with the weights as values,
//    ping-ponging between the two key and two value buffers (cub::DoubleBuffer): without it
//    CUB would keep a third copy of both in its temporary storage (~0.6 GB at N = 1.28M).
// 3. degrees: a double atomic add per sorted entry into its row (as the CPU sums the raw
//    entries before merging).
// 4. CUB ReduceByKey merges equal keys (duplicates add up) straight into the output data.
// 5. scale by 1 / sqrt(d_i d_j) (core/graph_math.h, overflow-safe) and split keys into columns;
//    indptr by a binary search of each row's first key in the sorted unique keys.
// One read-back at the end: the number of merged entries and the error flag.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_reduce.cuh>
#include <cuda/std/functional>

#include <cmath>

#include "core/check.h"
#include "core/graph_math.h"
#include "core/workspace_layout.h"
#include "cuda/common.cuh"
#include "cuda/normalize_cuda.h"

namespace rext::cuda {
namespace {

using Key = unsigned long long;
constexpr int kBlock = 256;

struct Small {
  int num_runs;
  int error;  // bit 0: index out of range, bit 1: weight not finite or negative
  long long nnz;
};

struct NormLayout {
  int64_t keys_a = 0, keys_b = 0, vals_a = 0, vals_b = 0, deg = 0, small = 0, temp = 0,
          temp_bytes = 0, total = 0;
};

int end_bit_for(int64_t n) {
  const Key top = Key(n) * Key(n);  // the sentinel, larger than every real key
  int bits = 0;
  while (bits < 64 && (top >> bits) != 0) ++bits;
  return bits > 0 ? bits : 1;
}

// CUB's temporary storage for both calls. The size queries pass exactly the argument types,
// item count and bit range of the real calls in sym_normalize_cuda (DoubleBuffers for the
// sort; const sorted inputs and non-const outputs for the merge), so the two cannot select
// different dispatch policies.
template <class T>
size_t cub_temp_bytes(int items, int end_bit, cudaStream_t stream) {
  size_t sort_bytes = 0, reduce_bytes = 0;
  Key* keys = nullptr;
  T* vals = nullptr;
  int* runs = nullptr;
  cub::DoubleBuffer<Key> key_buf(keys, keys);
  cub::DoubleBuffer<T> val_buf(vals, vals);
  REXT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, key_buf, val_buf, items,
                                                  0, end_bit, stream));
  const Key* sorted_keys = nullptr;
  const T* sorted_vals = nullptr;
  REXT_CUDA_CHECK(cub::DeviceReduce::ReduceByKey(nullptr, reduce_bytes, sorted_keys, keys,
                                                 sorted_vals, vals, runs,
                                                 ::cuda::std::plus<T>{}, items, stream));
  return sort_bytes > reduce_bytes ? sort_bytes : reduce_bytes;
}

template <class T>
NormLayout norm_layout(int64_t n, int64_t k, cudaStream_t stream) {
  const int64_t m = 2 * n * k;
  REXT_CHECK(m < int64_t(0x7fffffff), "indices: 2 N k = ", m,
             " graph entries exceed the CUDA normalisation's 2^31 limit");
  NormLayout l;
  Carve c;
  l.keys_a = c.take(m * 8);
  l.keys_b = c.take(m * 8);
  l.vals_a = c.take(m * int64_t(sizeof(T)));
  l.vals_b = c.take(m * int64_t(sizeof(T)));
  l.deg = c.take(n * 8);
  l.small = c.take(sizeof(Small));
  l.temp_bytes = int64_t(cub_temp_bytes<T>(int(m), end_bit_for(n), stream));
  l.temp = c.take(l.temp_bytes);
  l.total = c.offset;
  return l;
}

template <class T>
__global__ void expand(MatrixView<const int64_t> idx, MatrixView<const T> w, Key* keys, T* vals,
                       Small* small) {
  const int64_t n = idx.rows, k = idx.cols;
  const int64_t e = int64_t(blockIdx.x) * kBlock + threadIdx.x;
  if (e >= n * k) return;
  const int64_t i = e / k, c = e % k;
  const int64_t j = idx(i, c);
  const T v = w(i, c);
  int bad = 0;
  if (j < 0 || j >= n) bad |= 1;
  if (!(::isfinite(double(v)) && v >= T(0))) bad |= 2;
  if (bad) atomicOr(&small->error, bad);
  const Key sentinel = Key(n) * Key(n);
  if (bad || v == T(0)) {
    keys[2 * e] = keys[2 * e + 1] = sentinel;
    vals[2 * e] = vals[2 * e + 1] = T(0);
    return;
  }
  keys[2 * e] = Key(i) * Key(n) + Key(j);
  keys[2 * e + 1] = Key(j) * Key(n) + Key(i);
  vals[2 * e] = vals[2 * e + 1] = v;
}

template <class T>
__global__ void degrees(const Key* keys, const T* vals, int64_t m, int64_t n, double* deg) {
  const int64_t e = int64_t(blockIdx.x) * kBlock + threadIdx.x;
  if (e >= m) return;
  const Key key = keys[e];
  if (key >= Key(n) * Key(n)) return;
  atomicAdd(&deg[key / Key(n)], double(vals[e]));
}

__device__ __forceinline__ int64_t merged_count(const Key* unique, const Small* small,
                                                int64_t n) {
  const int64_t runs = small->num_runs;
  return runs > 0 && unique[runs - 1] >= Key(n) * Key(n) ? runs - 1 : runs;
}

template <class T>
__global__ void scale_entries(const Key* unique, const Small* small, const double* deg,
                              int64_t n, int64_t m, int64_t* out_indices, T* out_data) {
  const int64_t u = int64_t(blockIdx.x) * kBlock + threadIdx.x;
  if (u >= m || u >= merged_count(unique, small, n)) return;
  const Key key = unique[u];
  const int64_t row = int64_t(key / Key(n)), col = int64_t(key % Key(n));
  out_indices[u] = col;
  out_data[u] = T(double(out_data[u]) / sqrt_product(deg[row], deg[col]));
}

// indptr[r] = first position whose key is >= r*N (binary search in the sorted unique keys).
__global__ void row_pointers(const Key* unique, Small* small, int64_t n, int64_t* indptr) {
  const int64_t r = int64_t(blockIdx.x) * kBlock + threadIdx.x;
  if (r > n) return;
  const int64_t nnz = merged_count(unique, small, n);
  if (r == n) {
    indptr[n] = nnz;
    small->nnz = nnz;
    return;
  }
  const Key want = Key(r) * Key(n);
  int64_t lo = 0, hi = nnz;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (unique[mid] < want) lo = mid + 1; else hi = mid;
  }
  indptr[r] = lo;
}

}  // namespace

int64_t sym_normalize_workspace_bytes_cuda(Device dev, int64_t n, int64_t k, bool dbl) {
  REXT_CHECK(n >= 1 && k >= 1, "indices: expected a non-empty (N, k) array");
  DeviceGuard guard(dev.index);
  return dbl ? norm_layout<double>(n, k, nullptr).total : norm_layout<float>(n, k, nullptr).total;
}

template <class T>
int64_t sym_normalize_cuda(Device dev, MatrixView<const int64_t> indices,
                           MatrixView<const T> weights, int64_t* out_indptr, int64_t* out_indices,
                           T* out_data, const NormalizeParams& p) {
  const int64_t n = indices.rows, k = indices.cols;
  DeviceGuard guard(dev.index);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const NormLayout l = norm_layout<T>(n, k, stream);
  char* ws = workspace_base(p.workspace, l.total, "sym_normalize");
  Key* keys_a = reinterpret_cast<Key*>(ws + l.keys_a);
  Key* keys_b = reinterpret_cast<Key*>(ws + l.keys_b);
  T* vals_a = reinterpret_cast<T*>(ws + l.vals_a);
  T* vals_b = reinterpret_cast<T*>(ws + l.vals_b);
  double* deg = reinterpret_cast<double*>(ws + l.deg);
  Small* small = reinterpret_cast<Small*>(ws + l.small);
  void* temp = ws + l.temp;
  const int64_t m = 2 * n * k;

  REXT_CUDA_CHECK(cudaMemsetAsync(small, 0, sizeof(Small), stream));
  REXT_CUDA_CHECK(cudaMemsetAsync(deg, 0, n * sizeof(double), stream));
  expand<T><<<blocks_for(n * k, kBlock), kBlock, 0, stream>>>(indices, weights, keys_a, vals_a,
                                                              small);
  REXT_CUDA_CHECK(cudaGetLastError());
  size_t temp_bytes = size_t(l.temp_bytes);
  cub::DoubleBuffer<Key> key_buf(keys_a, keys_b);
  cub::DoubleBuffer<T> val_buf(vals_a, vals_b);
  REXT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, key_buf, val_buf, int(m), 0,
                                                  end_bit_for(n), stream));
  // The sorted data end up in either buffer, depending on the number of passes.
  const Key* sorted_keys = key_buf.Current();
  const T* sorted_vals = val_buf.Current();
  Key* unique = key_buf.Alternate();  // dead after the sort: takes the merged keys
  degrees<T><<<blocks_for(m, kBlock), kBlock, 0, stream>>>(sorted_keys, sorted_vals, m, n, deg);
  REXT_CUDA_CHECK(cudaGetLastError());
  // Sums go straight to the output data.
  temp_bytes = size_t(l.temp_bytes);
  REXT_CUDA_CHECK(cub::DeviceReduce::ReduceByKey(temp, temp_bytes, sorted_keys, unique,
                                                 sorted_vals, out_data, &small->num_runs,
                                                 ::cuda::std::plus<T>{}, int(m), stream));
  scale_entries<T><<<blocks_for(m, kBlock), kBlock, 0, stream>>>(unique, small, deg, n, m,
                                                                 out_indices, out_data);
  REXT_CUDA_CHECK(cudaGetLastError());
  row_pointers<<<blocks_for(n + 1, kBlock), kBlock, 0, stream>>>(unique, small, n, out_indptr);
  REXT_CUDA_CHECK(cudaGetLastError());

  Small host{};
  REXT_CUDA_CHECK(cudaMemcpyAsync(&host, small, sizeof(Small), cudaMemcpyDeviceToHost, stream));
  REXT_CUDA_CHECK(cudaStreamSynchronize(stream));
  REXT_CHECK(!(host.error & 1), "indices: entries must be in [0, ", n, ")");
  REXT_CHECK(!(host.error & 2), "weights: entries must be finite and >= 0");
  return host.nnz;
}

template int64_t sym_normalize_cuda<float>(Device, MatrixView<const int64_t>,
                                           MatrixView<const float>, int64_t*, int64_t*, float*,
                                           const NormalizeParams&);
template int64_t sym_normalize_cuda<double>(Device, MatrixView<const int64_t>,
                                            MatrixView<const double>, int64_t*, int64_t*, double*,
                                            const NormalizeParams&);

}  // namespace rext::cuda
