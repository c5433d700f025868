// DLPack: the ABI (structs as published in the DLPack 1.0 specification) and DlArray, which
// takes ownership of one "dltensor" / "dltensor_versioned" capsule and exposes it as a view.
// Argument names travel with the array so every error names what the user passed.
#pragma once
#include <Python.h>

#include <cstdint>
#include <string>

#include "core/check.h"
#include "core/views.h"

extern "C" {
typedef struct {
  int32_t device_type;  // 1 = CPU, 2 = CUDA, 3 = CUDA host, 13 = CUDA managed
  int32_t device_id;
} DLDevice;
typedef struct {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat
  uint8_t bits;
  uint16_t lanes;
} DLDataType;
typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL = compact row-major
  uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensor* self);
} DLManagedTensor;
typedef struct {
  uint32_t major;
  uint32_t minor;
} DLPackVersion;
typedef struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensorVersioned* self);
  uint64_t flags;  // bit 0: read-only
  DLTensor dl_tensor;
} DLManagedTensorVersioned;
}

namespace rext {

enum class DType { F32, F64, F16, BF16, I64, Other };

const char* dtype_name(DType t);

class DlArray {
 public:
  DlArray(PyObject* capsule, std::string name);
  ~DlArray();
  DlArray(const DlArray&) = delete;
  DlArray& operator=(const DlArray&) = delete;

  const std::string& name() const { return name_; }
  DType dtype() const;
  Device device() const;
  int64_t dim(int i) const { return t_->shape[i]; }
  int ndim() const { return t_->ndim; }

  // 2-D view; the column stride must be 1 (ops.py makes it so).
  template <class T>
  MatrixView<T> matrix(bool writable) const;
  // A 1-D contiguous uint8 buffer (a workspace): its writable bytes and their count.
  void* bytes(int64_t& count) const;
  // 1-D contiguous array of `len` elements.
  template <class T>
  T* vector(int64_t len, bool writable) const;

 private:
  void* data(bool writable) const;
  std::string name_;
  DLTensor* t_ = nullptr;
  DLManagedTensor* legacy_ = nullptr;
  DLManagedTensorVersioned* versioned_ = nullptr;
};

template <class T>
MatrixView<T> DlArray::matrix(bool writable) const {
  REXT_CHECK(t_->ndim == 2, name_, ": expected a 2-D array, got ", t_->ndim, "-D");
  const int64_t rows = t_->shape[0], cols = t_->shape[1];
  const int64_t rs = t_->strides ? t_->strides[0] : cols;
  const int64_t cs = t_->strides ? t_->strides[1] : 1;
  REXT_CHECK(cs == 1 || cols <= 1, name_, ": columns must be contiguous (column stride ", cs, ")");
  // Inputs may repeat rows (stride 0, e.g. numpy.broadcast_to); outputs may not overlap.
  REXT_CHECK(rows <= 1 || (writable ? rs >= cols : rs >= 0), name_, ": row stride ", rs,
             writable ? " overlaps rows of " : " is negative for rows of ", cols);
  using U = std::remove_const_t<T>;
  return MatrixView<T>{static_cast<U*>(data(writable)), rows, cols, rows <= 1 ? cols : rs};
}

template <class T>
T* DlArray::vector(int64_t len, bool writable) const {
  REXT_CHECK(t_->ndim == 1, name_, ": expected a 1-D array, got ", t_->ndim, "-D");
  REXT_CHECK(t_->shape[0] == len, name_, ": expected ", len, " elements, got ", t_->shape[0]);
  REXT_CHECK(!t_->strides || t_->strides[0] == 1 || len <= 1, name_, ": must be contiguous");
  using U = std::remove_const_t<T>;
  return static_cast<U*>(data(writable));
}

}  // namespace rext
