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

// Multiply-adds below which one more thread does not pay for itself: it would spend about as
// long being woken and waited for at the next synchronisation as it saves, and much longer
// when the machine's cores are shared with other processes.
constexpr double kWorkPerThread = double(1 << 18);

// The thread count: `threads` when the caller gave one (> 0). Otherwise one thread per
// kWorkPerThread of `work` (the multiply-adds the threads share between two synchronisations),
// at least 1 and at most omp_get_max_threads() (all cores, or OMP_NUM_THREADS).
inline int resolve_threads(int threads, double work) {
  if (threads > 0) return threads;
  const int most = omp_get_max_threads();
  const double useful = work / kWorkPerThread;
  return useful < 1 ? 1 : useful >= most ? most : int(useful);
}

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
