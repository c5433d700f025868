// Running per-row top-k, shared by the CPU and CUDA paths so that both follow the same rule:
// larger similarity first; on equal similarity the smaller column index first.
#pragma once
#include <cstdint>

#include "core/views.h"

namespace rext {

// True when candidate (s, j) ranks strictly ahead of (t, i).
template <class T>
REXT_HD bool topk_before(T s, int64_t j, T t, int64_t i) {
  return s > t || (s == t && j < i);
}

// Insert (s, j) into the descending list vals/idx of length k if it ranks ahead of the last
// entry. Empty slots hold (-inf, -1), which any finite candidate beats. Returns whether it
// was inserted.
template <class T>
REXT_HD bool topk_insert(T* vals, int64_t* idx, int64_t k, T s, int64_t j) {
  if (!topk_before(s, j, vals[k - 1], idx[k - 1] < 0 ? INT64_MAX : idx[k - 1])) return false;
  int64_t p = k - 1;
  while (p > 0 && topk_before(s, j, vals[p - 1], idx[p - 1] < 0 ? INT64_MAX : idx[p - 1])) {
    vals[p] = vals[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  vals[p] = s;
  idx[p] = j;
  return true;
}

}  // namespace rext
