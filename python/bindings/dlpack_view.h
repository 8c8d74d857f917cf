// Zero-copy views of caller arrays through the DLPack protocol (numpy, torch, CuPy, ...).
// The struct layouts follow the DLPack ABI (v0.8 unversioned and v1.x versioned capsules).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace lowbit {

namespace dl {
struct Device { int32_t device_type; int32_t device_id; };
struct DataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct Tensor {
  void* data; Device device; int32_t ndim; DataType dtype;
  int64_t* shape; int64_t* strides; uint64_t byte_offset;
};
struct ManagedTensor { Tensor dl_tensor; void* manager_ctx; void (*deleter)(ManagedTensor*); };
struct PackVersion { uint32_t major; uint32_t minor; };
struct ManagedTensorVersioned {
  PackVersion version; void* manager_ctx; void (*deleter)(ManagedTensorVersioned*);
  uint64_t flags; Tensor dl_tensor;
};
constexpr uint64_t kFlagReadOnly = 1;
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4 };
enum DeviceType : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kCUDAManaged = 13 };
}  // namespace dl

// Element type names used in messages and checks: "float32", "float16", "bfloat16", "int8", ...
std::string dtype_name(const dl::DataType& t);

// A borrowed, validated view; keeps the producer's capsule (and so the memory) alive.
struct ArrayView {
  pybind11::object capsule;
  void* data = nullptr;
  std::string dtype;
  std::vector<int64_t> shape, strides;  // strides in elements
  int32_t device_type = dl::kCPU, device_id = 0;
  bool read_only = false;

  int64_t numel() const;
  bool is_cuda() const { return device_type == dl::kCUDA || device_type == dl::kCUDAManaged; }
  bool row_contiguous() const;  // the last axis has unit stride and rows do not overlap
  bool contiguous() const;
};

// numpy arrays and torch tensors viewed without a DLPack capsule (a __dlpack__ call costs µs on
// the CPU and tens of µs for a CUDA tensor); false for anything else, which then goes through
// DLPack. Fills device_type/device_id; read_only is set for read-only numpy arrays.
bool view_direct(const pybind11::handle& obj, ArrayView& v);

// obj: any object with __dlpack__. `name` is the argument name used in error messages.
// stream: for CUDA producers, the stream the kernel will run on (-1: none/CPU).
ArrayView view_array(const pybind11::handle& obj, const char* name, bool writable,
                     int64_t stream = -1);

}  // namespace lowbit
