// CPU workspace helpers: 64-byte aligned scratch buffers, a check that refuses sizes which
// would not fit in memory (with the estimate in the message), and the thread count rule.
#pragma once
#include <omp.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <cstdlib>
#include <memory>
#include <new>

#include "core/check.h"

namespace rext::cpu {

// Thrown when a workspace would not fit; maps to MemoryError.
struct WorkspaceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline int resolve_threads(int threads) { return threads > 0 ? threads : omp_get_max_threads(); }

inline std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", bytes / double(1 << 30));
  return buf;
}

inline void check_workspace(double bytes, const char* what) {
  const double phys = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGE_SIZE));
  if (phys > 0 && bytes > 0.9 * phys)
    throw WorkspaceError(detail::concat(what, ": needs about ", gib(bytes),
                                        " GiB of workspace, over 90% of this machine's ", gib(phys),
                                        " GiB of memory; reduce N, d or k"));
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

template <class T>
using AlignedBuffer = std::unique_ptr<T[], FreeDeleter>;

template <class T>
AlignedBuffer<T> aligned_buffer(int64_t count) {
  const size_t bytes = ((size_t(count) * sizeof(T) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes > 0 ? bytes : 64);
  if (!p) throw std::bad_alloc();
  return AlignedBuffer<T>(static_cast<T*>(p));
}

}  // namespace rext::cpu
