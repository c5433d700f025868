#include "cuda/cusparse_lib.h"

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <stdexcept>

namespace rext::cuda {
namespace {

struct Loaded {
  std::mutex mutex;
  bool done = false;
  std::string what;  // the path or soname that opened
  CusparseApi api{};
};

Loaded& loaded() {
  static Loaded l;
  return l;
}

template <class F>
void resolve(void* lib, const char* name, F& slot, std::string& missing) {
  slot = reinterpret_cast<F>(dlsym(lib, name));
  if (!slot) missing += std::string(missing.empty() ? "" : ", ") + name;
}

// The entry points of `lib`, or the names it lacks.
std::string resolve_all(void* lib, CusparseApi& a) {
  std::string missing;
  resolve(lib, "cusparseGetErrorString", a.get_error_string, missing);
  resolve(lib, "cusparseCreate", a.create, missing);
  resolve(lib, "cusparseSetStream", a.set_stream, missing);
  resolve(lib, "cusparseCreateConstCsr", a.create_const_csr, missing);
  resolve(lib, "cusparseCreateConstDnMat", a.create_const_dn_mat, missing);
  resolve(lib, "cusparseCreateDnMat", a.create_dn_mat, missing);
  resolve(lib, "cusparseDestroySpMat", a.destroy_sp_mat, missing);
  resolve(lib, "cusparseDestroyDnMat", a.destroy_dn_mat, missing);
  resolve(lib, "cusparseSpMM_bufferSize", a.spmm_buffer_size, missing);
  resolve(lib, "cusparseSpMM", a.spmm, missing);
  return missing;
}

}  // namespace

std::string load_cusparse(const std::vector<std::string>& candidates) {
  Loaded& l = loaded();
  std::lock_guard<std::mutex> lock(l.mutex);
  if (l.done) return l.what;
  std::vector<std::string> tries;
  const char* env = std::getenv("REXT_CUSPARSE_LIBRARY");
  if (env && *env) {
    tries.push_back(env);
  } else {
    tries.push_back("libcusparse.so.12");
    tries.insert(tries.end(), candidates.begin(), candidates.end());
  }
  std::string report;
  for (const std::string& name : tries) {
    void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* why = dlerror();  // names the file itself
      report += "\n  " + (why ? std::string(why) : name + ": not opened");
      continue;
    }
    CusparseApi api{};
    const std::string missing = resolve_all(lib, api);
    if (!missing.empty()) {
      report += "\n  " + name + ": opened, but lacks " + missing;
      dlclose(lib);
      continue;
    }
    l.api = api;
    l.what = name;
    l.done = true;  // the library stays open for the life of the process
    return l.what;
  }
  throw std::runtime_error(
      "spmm='cusparse': could not load cuSPARSE (libcusparse.so.12); tried:" + report +
      (env && *env ? "" : "\n(set REXT_CUSPARSE_LIBRARY to its full path, or install the "
                          "nvidia-cusparse wheel)"));
}

const CusparseApi& cusparse_api() {
  load_cusparse({});
  return loaded().api;  // written once under the lock, before `done`; never again
}

void cusparse_check(cusparseStatus_t status, const char* call) {
  if (status == CUSPARSE_STATUS_SUCCESS) return;
  const char* what = loaded().api.get_error_string ? loaded().api.get_error_string(status)
                                                   : "unknown status";
  throw std::runtime_error(std::string("cuSPARSE error in ") + call + ": " + what + " (status " +
                           std::to_string(int(status)) + ")");
}

CusparseHandle::CusparseHandle(int device, cudaStream_t stream) {
  const CusparseApi& api = cusparse_api();
  static std::mutex table_mutex;
  static std::map<int, std::pair<std::mutex, cusparseHandle_t>> table;
  std::pair<std::mutex, cusparseHandle_t>* entry;
  {
    std::lock_guard<std::mutex> lock(table_mutex);
    entry = &table[device];  // map nodes never move
  }
  lock_ = std::unique_lock<std::mutex>(entry->first);
  if (!entry->second) cusparse_check(api.create(&entry->second), "cusparseCreate");
  handle_ = entry->second;
  cusparse_check(api.set_stream(handle_, stream), "cusparseSetStream");
}

}  // namespace rext::cuda
