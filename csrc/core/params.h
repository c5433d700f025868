// One plain-typed parameter struct per op, shared by the CPU and CUDA paths.
#pragma once
#include <cstdint>

namespace rext {

enum class Weight { Relu, Shift };  // f(s) = max(s,0)^gamma  |  ((1+s)/2)^gamma

// Operand precision of the similarity tiles. Exact: the input dtype's own arithmetic. Tf32 /
// Bf16: tensor-core operands with float32 accumulation (float32 input on CUDA only); the final
// k neighbours are re-scored in float32 so the weights are exact dot products.
enum class Precision { Exact, Tf32, Bf16 };

// Caller-allocated device scratch (CUDA only; ignored on the CPU). Its size comes from the
// matching *_workspace_bytes function; the kernels never allocate.
struct Workspace {
  void* ptr = nullptr;
  int64_t bytes = 0;
};

struct AffinityParams {
  int64_t k = 20;
  bool exclude_self = true;
  bool normalize = false;   // L2-normalise rows before the dot products
  Weight weight = Weight::Relu;
  double gamma = 1.0;
  int64_t block_rows = 0;   // tile size (rows and columns); 0 = chosen from cache sizes
  int threads = 0;          // 0 = all cores
  void* stream = nullptr;   // CUDA stream (cudaStream_t), ignored on CPU
  Precision precision = Precision::Exact;
  Workspace workspace;
  // The query block: the graph's rows [query_start, query_stop) of x, each searched against
  // every row of x, with global column indices (query_stop = -1: all rows, the whole graph).
  // Ignored when the kernel is given separate query rows, which are not rows of x.
  int64_t query_start = 0;
  int64_t query_stop = -1;
};

struct NormalizeParams {
  int threads = 0;
  void* stream = nullptr;
  Workspace workspace;
};

// The sparse x dense product of each CG iteration on CUDA. Kernel: our own, fused with the
// column dot products. Cusparse: cuSPARSE's SpMM (loaded at run time) and a dot-product pass.
// The CPU has its own product and takes Kernel only.
enum class Spmm { Kernel, Cusparse };

struct CgParams {
  double alpha = 0.99;
  int64_t max_iter = 20;
  double tol = 1e-6;
  int threads = 0;
  void* stream = nullptr;
  Workspace workspace;
  Spmm spmm = Spmm::Kernel;
};

}  // namespace rext
