// cuSPARSE without a link-time dependency: the library is opened with dlopen on first use and
// the few entry points the CG needs are resolved into pointers typed from cusparse.h. The
// wheel therefore imports (and auditwheel repairs it) without cuSPARSE anywhere; only a solve
// that asks for spmm='cusparse' needs libcusparse.so.12 (torch's CUDA wheels bring it).
#pragma once
#include <cusparse.h>

#include <mutex>
#include <string>
#include <vector>

namespace rext::cuda {

struct CusparseApi {
  decltype(&cusparseGetErrorString) get_error_string;
  decltype(&cusparseCreate) create;
  decltype(&cusparseSetStream) set_stream;
  decltype(&cusparseCreateConstCsr) create_const_csr;
  decltype(&cusparseCreateConstDnMat) create_const_dn_mat;
  decltype(&cusparseCreateDnMat) create_dn_mat;
  decltype(&cusparseDestroySpMat) destroy_sp_mat;
  decltype(&cusparseDestroyDnMat) destroy_dn_mat;
  decltype(&cusparseSpMM_bufferSize) spmm_buffer_size;
  decltype(&cusparseSpMM) spmm;
};

// Opens the library once per process and returns what was opened. Tried in order:
// $REXT_CUSPARSE_LIBRARY (when set, only that), the soname libcusparse.so.12 (already in the
// process when torch has loaded it, else found by the loader's search path), then `candidates`
// (paths the Python layer found, e.g. site-packages' nvidia/cu13/lib). Throws
// std::runtime_error listing every try when none opens or an entry point is missing.
std::string load_cusparse(const std::vector<std::string>& candidates);

// The entry points (load_cusparse with no extra candidates when nothing is loaded yet).
const CusparseApi& cusparse_api();

// Throws std::runtime_error naming `call` unless `status` is CUSPARSE_STATUS_SUCCESS.
void cusparse_check(cusparseStatus_t status, const char* call);

// The device's cuSPARSE handle, bound to `stream`, locked while this object lives: a handle
// carries its stream, so two host threads on one device must not interleave their SetStream
// and SpMM calls (hold it around one call, not a whole solve). One handle per device for the
// life of the process, created on the device's first use with that device current; never
// destroyed, since process exit may come after the CUDA runtime has torn down.
class CusparseHandle {
 public:
  CusparseHandle(int device, cudaStream_t stream);
  cusparseHandle_t get() const { return handle_; }

 private:
  std::unique_lock<std::mutex> lock_;
  cusparseHandle_t handle_ = nullptr;
};

}  // namespace rext::cuda
