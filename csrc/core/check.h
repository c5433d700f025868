// Error types shared by every kernel. Kernels stay framework-free: they throw these standard
// exceptions and bindings/module.cpp maps them onto Python's TypeError / ValueError /
// RuntimeError, so nothing ever aborts the interpreter.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace rext {

// Wrong dtype or kind of array (maps to TypeError).
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Wrong shape, value or device (maps to ValueError): std::invalid_argument itself.

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace rext

// REXT_CHECK(cond, parts...) throws std::invalid_argument("parts...") when cond is false.
#define REXT_CHECK(cond, ...)                                              \
  do {                                                                     \
    if (!(cond)) throw std::invalid_argument(::rext::detail::concat(__VA_ARGS__)); \
  } while (0)

#define REXT_CHECK_TYPE(cond, ...)                                         \
  do {                                                                     \
    if (!(cond)) throw ::rext::TypeError(::rext::detail::concat(__VA_ARGS__)); \
  } while (0)
