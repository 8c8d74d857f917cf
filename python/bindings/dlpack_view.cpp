#include "dlpack_view.h"

#include <pybind11/numpy.h>

#include <stdexcept>

namespace py = pybind11;

namespace lowbit {

std::string dtype_name(const dl::DataType& t) {
  if (t.lanes != 1) return "vector type";
  switch (t.code) {
    case dl::kFloat: return "float" + std::to_string(t.bits);
    case dl::kBfloat: return t.bits == 16 ? "bfloat16" : "bfloat" + std::to_string(t.bits);
    case dl::kInt: return "int" + std::to_string(t.bits);
    case dl::kUInt: return "uint" + std::to_string(t.bits);
    default: return "type code " + std::to_string(t.code);
  }
}

int64_t ArrayView::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

bool ArrayView::row_contiguous() const {
  if (shape.empty()) return true;
  size_t d = shape.size();
  if (shape[d - 1] > 1 && strides[d - 1] != 1) return false;
  if (d == 2 && shape[0] > 1 && strides[0] < shape[1]) return false;
  return d <= 2 || contiguous();
}

bool ArrayView::contiguous() const {
  int64_t expect = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] > 1 && strides[i] != expect) return false;
    expect *= shape[i];
  }
  return true;
}

// A numpy array read straight from the array object: no DLPack capsule (a __dlpack__ call costs
// a few µs, a large share of a small matmul's time). False for what this does not describe the
// way DLPack would (other dtypes, byte-swapped data, strides that are not whole elements): those
// take the DLPack path, which reports them.
static bool view_numpy(const py::handle& obj, ArrayView& v) {
  if (!py::isinstance<py::array>(obj)) return false;
  auto a = py::reinterpret_borrow<py::array>(obj);
  const py::dtype dt = a.dtype();
  const char kind = dt.kind();
  const int64_t size = dt.itemsize();
  if ((kind != 'f' && kind != 'i' && kind != 'u') || dt.byteorder() == '>') return false;
  v.dtype = (kind == 'f' ? "float" : kind == 'i' ? "int" : "uint") + std::to_string(8 * size);
  v.shape.assign(a.shape(), a.shape() + a.ndim());
  v.strides.resize(size_t(a.ndim()));
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (a.strides(d) % size != 0) return false;
    v.strides[size_t(d)] = a.strides(d) / size;
  }
  v.data = const_cast<void*>(a.data());
  v.read_only = !a.writeable();
  v.capsule = py::reinterpret_borrow<py::object>(obj);  // keeps the memory alive
  return true;
}

// A torch tensor read through its own attributes. torch's __dlpack__ is Python code that asks for
// the current stream and device several times: 20-80 µs per CUDA array, more than a decode GEMM
// takes on the GPU. Its stream argument only orders the producer's stream before ours, and the
// kernels run on the caller's current stream, the one torch itself works on. False (the DLPack
// path decides) for what DLPack would treat differently: tensors that require grad (DLPack
// refuses them), non-strided layouts, negative-bit views, devices other than cpu/cuda, and
// dtypes the kernels never take.
static bool view_torch(const py::handle& obj, ArrayView& v) {
  PyObject* torch = PyDict_GetItemString(PyImport_GetModuleDict(), "torch");  // borrowed
  if (torch == nullptr) return false;  // torch was never imported: obj cannot be a tensor
  static PyObject* tensor_type = nullptr;  // torch.Tensor, looked up once torch is there
  if (tensor_type == nullptr) {
    tensor_type = PyObject_GetAttrString(torch, "Tensor");  // kept for the process's lifetime
    if (tensor_type == nullptr) { PyErr_Clear(); return false; }
  }
  if (PyObject_IsInstance(obj.ptr(), tensor_type) != 1) { PyErr_Clear(); return false; }
  if (obj.attr("requires_grad").cast<bool>() || obj.attr("is_neg")().cast<bool>()) return false;
  if (std::string(py::str(obj.attr("layout"))) != "torch.strided") return false;
  std::string dt = py::str(obj.attr("dtype"));
  if (dt.rfind("torch.", 0) != 0) return false;
  dt = dt.substr(6);
  static const char* const kDtypes[] = {"float32", "float16", "bfloat16", "float64", "int8",
                                        "uint8", "int16", "int32", "int64"};
  bool known = false;
  for (const char* k : kDtypes) known = known || dt == k;
  if (!known) return false;
  const py::object dev = obj.attr("device");
  const std::string type = py::str(dev.attr("type"));
  if (type == "cuda") {
    const py::object index = dev.attr("index");
    v.device_type = dl::kCUDA;
    v.device_id = index.is_none() ? 0 : index.cast<int>();
  } else if (type != "cpu") {
    return false;
  }
  v.dtype = dt;
  for (const auto& d : py::reinterpret_borrow<py::tuple>(obj.attr("shape"))) v.shape.push_back(d.cast<int64_t>());
  for (const auto& d : py::tuple(obj.attr("stride")())) v.strides.push_back(d.cast<int64_t>());
  v.data = reinterpret_cast<void*>(obj.attr("data_ptr")().cast<uintptr_t>());
  v.capsule = py::reinterpret_borrow<py::object>(obj);  // keeps the storage alive
  return true;
}

bool view_direct(const py::handle& obj, ArrayView& v) {
  return view_numpy(obj, v) || view_torch(obj, v);
}

ArrayView view_array(const py::handle& obj, const char* name, bool writable, int64_t stream) {
  {
    ArrayView v;
    if (view_direct(obj, v)) {
      if (writable && v.read_only) throw py::value_error(std::string(name) + " is read-only");
      return v;
    }
  }
  if (!py::hasattr(obj, "__dlpack__"))
    throw py::type_error(std::string(name) + " must be an array (numpy, torch, CuPy); got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  ArrayView v;
  py::object capsule;
  py::dict kwargs;
  if (stream >= 0) kwargs["stream"] = stream;
  try {
    kwargs["max_version"] = py::make_tuple(1, 0);
    capsule = obj.attr("__dlpack__")(**kwargs);
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw;
    kwargs = py::dict();
    if (stream >= 0) kwargs["stream"] = stream;
    capsule = obj.attr("__dlpack__")(**kwargs);  // producer predates versioned DLPack
  }
  const dl::Tensor* t = nullptr;
  PyObject* cap = capsule.ptr();
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* m = static_cast<dl::ManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
    if (m->version.major != 1)
      throw py::value_error(std::string(name) + ": unsupported DLPack version " +
                            std::to_string(m->version.major));
    v.read_only = m->flags & dl::kFlagReadOnly;
    t = &m->dl_tensor;
  } else if (PyCapsule_IsValid(cap, "dltensor")) {
    t = &static_cast<dl::ManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"))->dl_tensor;
  } else {
    throw py::type_error(std::string(name) + ": __dlpack__ did not return a DLPack capsule");
  }
  v.capsule = capsule;
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  v.dtype = dtype_name(t->dtype);
  v.device_type = t->device.device_type;
  v.device_id = t->device.device_id;
  v.shape.assign(t->shape, t->shape + t->ndim);
  if (t->strides) {
    v.strides.assign(t->strides, t->strides + t->ndim);
  } else {  // null strides mean C-contiguous
    v.strides.resize(t->ndim);
    int64_t s = 1;
    for (int i = t->ndim; i-- > 0;) { v.strides[i] = s; s *= t->shape[i]; }
  }
  if (writable && v.read_only) throw py::value_error(std::string(name) + " is read-only");
  return v;
}

}  // namespace lowbit
