#include "bindings/dlpack.h"

#include <cstring>
#include <stdexcept>

namespace rext {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::I64: return "int64";
    default: return "an unsupported dtype";
  }
}

DlArray::DlArray(PyObject* capsule, std::string name) : name_(std::move(name)) {
  if (PyCapsule_IsValid(capsule, "dltensor_versioned")) {
    versioned_ = static_cast<DLManagedTensorVersioned*>(
        PyCapsule_GetPointer(capsule, "dltensor_versioned"));
    REXT_CHECK(versioned_->version.major == 1, name_, ": unsupported DLPack major version ",
               versioned_->version.major);
    PyCapsule_SetName(capsule, "used_dltensor_versioned");
    t_ = &versioned_->dl_tensor;
  } else if (PyCapsule_IsValid(capsule, "dltensor")) {
    legacy_ = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    PyCapsule_SetName(capsule, "used_dltensor");
    t_ = &legacy_->dl_tensor;
  } else {
    throw TypeError(name_ + ": expected an unused DLPack capsule");
  }
}

DlArray::~DlArray() {
  if (versioned_ && versioned_->deleter) versioned_->deleter(versioned_);
  if (legacy_ && legacy_->deleter) legacy_->deleter(legacy_);
}

DType DlArray::dtype() const {
  const DLDataType d = t_->dtype;
  if (d.lanes != 1) return DType::Other;
  if (d.code == 2 && d.bits == 32) return DType::F32;
  if (d.code == 2 && d.bits == 64) return DType::F64;
  if (d.code == 2 && d.bits == 16) return DType::F16;
  if (d.code == 4 && d.bits == 16) return DType::BF16;
  if (d.code == 0 && d.bits == 64) return DType::I64;
  return DType::Other;
}

Device DlArray::device() const {
  switch (t_->device.device_type) {
    // Pinned host memory is ordinary host memory to the CPU kernels, and managed memory is
    // addressable by the CUDA kernels: the same classes as ops.py's placement check.
    case 1:  // kDLCPU
    case 3:  // kDLCUDAHost
      return {DeviceKind::CPU, 0};
    case 2:   // kDLCUDA
    case 13:  // kDLCUDAManaged
      return {DeviceKind::CUDA, t_->device.device_id};
    default:
      throw std::invalid_argument(name_ + ": arrays must live on the CPU or a CUDA device "
                                  "(DLPack device type " + std::to_string(t_->device.device_type) + ")");
  }
}

void* DlArray::bytes(int64_t& count) const {
  const DLDataType d = t_->dtype;
  REXT_CHECK_TYPE(d.code == 1 && d.bits == 8 && d.lanes == 1, name_, ": must be a uint8 buffer");
  REXT_CHECK(t_->ndim == 1, name_, ": expected a 1-D buffer, got ", t_->ndim, "-D");
  REXT_CHECK(!t_->strides || t_->strides[0] == 1 || t_->shape[0] <= 1, name_,
             ": must be contiguous");
  count = t_->shape[0];
  return data(true);
}

void* DlArray::data(bool writable) const {
  if (writable && versioned_ && (versioned_->flags & 1u))
    throw std::invalid_argument(name_ + ": output array is read-only");
  const int64_t elems = [&] {
    int64_t e = 1;
    for (int i = 0; i < t_->ndim; ++i) e *= t_->shape[i];
    return e;
  }();
  REXT_CHECK(elems == 0 || t_->data != nullptr, name_, ": null data pointer");
  return static_cast<char*>(t_->data) + t_->byte_offset;
}

}  // namespace rext
