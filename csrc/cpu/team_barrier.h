// A barrier for the threads of one OpenMP parallel region that spins only briefly before it
// sleeps. libgomp's own barriers spin for its GOMP_SPINCOUNT (up to milliseconds with the
// PAUSE latency of current CPUs) unless OMP_WAIT_POLICY=passive was set before the runtime
// loaded, which a library cannot arrange. On a machine whose cores are busy with other
// processes, a thread spinning at a barrier uses up the time slice that the thread it waits
// for needs, so a loop with a few barriers per iteration (the CG solve) ran several times
// slower on two threads than on one. Sleeping on a condition variable gives the core back;
// the short spin keeps the wake-up cost off an idle machine, where the threads arrive within
// microseconds of each other. The mutex and condition variable are POSIX's: libstdc++ 12
// versions std::condition_variable::wait as GLIBCXX_3.4.30, newer than the manylinux_2_34
// wheels may require, while pthread_cond_wait is as old as glibc's threads.
#pragma once
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdint>

namespace rext::cpu {

class TeamBarrier {
 public:
  TeamBarrier() {
    pthread_mutex_init(&mutex_, nullptr);
    pthread_cond_init(&wake_, nullptr);
  }
  ~TeamBarrier() {
    pthread_cond_destroy(&wake_);
    pthread_mutex_destroy(&mutex_);
  }
  TeamBarrier(const TeamBarrier&) = delete;
  TeamBarrier& operator=(const TeamBarrier&) = delete;

  // The team's size, set by one thread before any thread waits: a region may run with fewer
  // threads than it asked for (nested in another region, OMP_DYNAMIC, thread limits).
  void set_count(int count) { count_ = count; }

  // Every thread of the team calls wait(); it returns once all `count` have. Writes made
  // before wait() are visible to every thread after it.
  void wait() {
    pthread_mutex_lock(&mutex_);
    const uint64_t phase = phase_.load(std::memory_order_relaxed);
    if (++arrived_ == count_) {
      arrived_ = 0;
      phase_.store(phase + 1, std::memory_order_release);
      pthread_mutex_unlock(&mutex_);
      pthread_cond_broadcast(&wake_);
      return;
    }
    pthread_mutex_unlock(&mutex_);
    const auto until = std::chrono::steady_clock::now() + kSpin;
    do {
      for (int i = 0; i < 64; ++i) {
        if (phase_.load(std::memory_order_acquire) != phase) return;
        pause();
      }
    } while (std::chrono::steady_clock::now() < until);
    // the phase changes under the mutex, so a waiter either sees it changed here or is
    // already waiting when the last thread broadcasts
    pthread_mutex_lock(&mutex_);
    while (phase_.load(std::memory_order_acquire) == phase) pthread_cond_wait(&wake_, &mutex_);
    pthread_mutex_unlock(&mutex_);
  }

 private:
  // Long enough to cover the imbalance of one CG pass on an idle machine, short against a
  // scheduler time slice (milliseconds).
  static constexpr std::chrono::microseconds kSpin{50};

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  pthread_mutex_t mutex_;
  pthread_cond_t wake_;
  int count_ = 1;
  int arrived_ = 0;
  std::atomic<uint64_t> phase_{0};
};

}  // namespace rext::cpu
