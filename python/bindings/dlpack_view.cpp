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

// What view_torch looks up once torch is imported, kept for the process's lifetime: the names
// interned, torch.Tensor, torch.strided and the dtype objects (singletons) with their names.
// Attribute lookups by interned name and a dtype compared by identity, not by its str, take the
// view of a tensor from 2.3 µs to 0.8 (a CPU matmul call views two or three).
struct TorchNames {
  PyObject *tensor = nullptr, *strided = nullptr;
  PyObject *requires_grad, *is_neg, *layout, *dtype, *is_cuda, *is_cpu, *get_device, *shape, *stride, *data_ptr;
  std::vector<std::pair<PyObject*, const char*>> dtypes;
  bool init(PyObject* torch) {
    auto intern = [](const char* n) { return PyUnicode_InternFromString(n); };
    requires_grad = intern("requires_grad"), is_neg = intern("is_neg"), layout = intern("layout");
    dtype = intern("dtype"), is_cuda = intern("is_cuda"), is_cpu = intern("is_cpu");
    get_device = intern("get_device"), shape = intern("shape"), stride = intern("stride");
    data_ptr = intern("data_ptr");
    tensor = PyObject_GetAttrString(torch, "Tensor");
    strided = PyObject_GetAttrString(torch, "strided");
    for (const char* n : {"float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64"}) {
      PyObject* d = PyObject_GetAttrString(torch, n);
      if (d == nullptr) break;
      dtypes.emplace_back(d, n);
    }
    if (tensor == nullptr || strided == nullptr || dtypes.size() != 9) { PyErr_Clear(); return false; }
    return true;
  }
};

// A call's result as a py::object (nullptr from Python: its error is raised).
static py::object call0(PyObject* obj, PyObject* name) {
  PyObject* r = PyObject_CallMethodNoArgs(obj, name);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}
static py::object get(PyObject* obj, PyObject* name) {
  PyObject* r = PyObject_GetAttr(obj, name);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// A torch tensor read through its own attributes. torch's __dlpack__ is Python code that asks for
// the current stream and device several times: 20-80 µs per CUDA array, more than a decode GEMM
// takes on the GPU. Its stream argument only orders the producer's stream before ours, and the
// kernels run on the caller's current stream, the one torch itself works on. False (the DLPack
// path decides) for what DLPack would treat differently: tensors that require grad (DLPack
// refuses them), non-strided layouts, devices other than cpu/cuda, and dtypes the kernels never
// take. Negative-bit views are refused with an error.
static bool view_torch(const py::handle& obj, ArrayView& v) {
  PyObject* torch = PyDict_GetItemString(PyImport_GetModuleDict(), "torch");  // borrowed
  if (torch == nullptr) return false;  // torch was never imported: obj cannot be a tensor
  static TorchNames* names = nullptr;
  if (names == nullptr) {
    auto* n = new TorchNames();  // kept for the process's lifetime
    if (!n->init(torch)) { delete n; return false; }
    names = n;
  }
  const TorchNames& t = *names;
  PyObject* o = obj.ptr();
  if (PyObject_IsInstance(o, t.tensor) != 1) { PyErr_Clear(); return false; }
  if (get(o, t.requires_grad).ptr() == Py_True) return false;
  // torch's DLPack export hands over a negative-bit view's storage as is, the values un-negated
  if (call0(o, t.is_neg).ptr() == Py_True)
    throw py::value_error("a torch tensor with its negative bit set (a lazy torch.neg view) cannot be read in place; "
                          "call .resolve_neg() on it first");
  if (get(o, t.layout).ptr() != t.strided) return false;
  const py::object dt = get(o, t.dtype);
  const char* name = nullptr;
  for (const auto& [d, n] : t.dtypes) name = d == dt.ptr() ? n : name;
  if (name == nullptr) return false;
  if (get(o, t.is_cuda).ptr() == Py_True) {
    v.device_type = dl::kCUDA;
    v.device_id = call0(o, t.get_device).cast<int>();
  } else if (get(o, t.is_cpu).ptr() != Py_True) {
    return false;
  }
  v.dtype = name;
  const py::object shape = get(o, t.shape), stride = call0(o, t.stride);  // tuples (torch.Size is one)
  if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(stride.ptr()) || PyTuple_GET_SIZE(shape.ptr()) != PyTuple_GET_SIZE(stride.ptr()))
    return false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(shape.ptr()); ++i) {
    v.shape.push_back(PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), i)));
    v.strides.push_back(PyLong_AsLongLong(PyTuple_GET_ITEM(stride.ptr(), i)));
  }
  v.data = reinterpret_cast<void*>(call0(o, t.data_ptr).cast<uintptr_t>());
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
