// Running per-row top-k, shared by the CPU and CUDA paths so that both follow the same rule:
// larger similarity first; on equal similarity the smaller column index first.
// Empty slots hold (-inf, -1); topk_slot maps the -1 to "after every real column" so that any
// candidate with a finite similarity (or -inf and a real index) ranks ahead of an empty slot.
#pragma once
#include <cstdint>

#include "core/views.h"

namespace rext {

// True when candidate (s, j) ranks strictly ahead of (t, i).
template <class T>
REXT_HD bool topk_before(T s, int64_t j, T t, int64_t i) {
  return s > t || (s == t && j < i);
}

// The index an empty slot (-1) compares as: larger than every real column.
REXT_HD int64_t topk_slot(int64_t i) { return i < 0 ? INT64_MAX : i; }

// True when candidate (s, j) ranks ahead of the stored slot (t, i), which may be empty.
template <class T>
REXT_HD bool topk_beats_slot(T s, int64_t j, T t, int64_t i) {
  return topk_before(s, j, t, topk_slot(i));
}

// Insert (s, j) into the descending list vals/idx of length k if it ranks ahead of the last
// entry. Returns whether it was inserted. Index type I: int64_t on the CPU, int32_t in the
// CUDA kernel's lists (N < 2^31 there).
template <class T, class I>
REXT_HD bool topk_insert(T* vals, I* idx, int64_t k, T s, int64_t j) {
  if (!topk_beats_slot(s, j, vals[k - 1], int64_t(idx[k - 1]))) return false;
  int64_t p = k - 1;
  while (p > 0 && topk_beats_slot(s, j, vals[p - 1], int64_t(idx[p - 1]))) {
    vals[p] = vals[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  vals[p] = s;
  idx[p] = I(j);
  return true;
}

// Sorts a short list into the top-k order (descending value, ascending index) by insertion:
// used after re-scoring neighbours exactly, when the list is already nearly in order, so the
// cost stays close to O(k).
template <class T, class I>
REXT_HD void topk_sort(T* vals, I* idx, int64_t k) {
  for (int64_t a = 1; a < k; ++a) {
    const T v = vals[a];
    const I j = idx[a];
    int64_t p = a;
    while (p > 0 && topk_beats_slot(v, int64_t(j), vals[p - 1], int64_t(idx[p - 1]))) {
      vals[p] = vals[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    vals[p] = v;
    idx[p] = j;
  }
}

}  // namespace rext
