// lowbit._cuda: the CUDA extension. Same arguments, meaning and checks as lowbit._core
// (core_module.cpp), for arrays in GPU memory, plus `stream` (the caller's current stream as a
// DLPack stream value: 1 = legacy default) and an optional `status` buffer for bad-input reports.
// Validates, unwraps DLPack views (handing the producer our stream, so it orders its pending work
// before ours), releases the GIL and calls cuda/lowbit_cuda.cuh — no arithmetic, no CUDA headers.
//
// Bad input the CPU path raises for (NaN/Inf in w, out-of-range given scales/zeros or int4 codes)
// is only visible on the device. quantize and pack_int4 take `status`: a CUDA int32 [2] array the
// kernel zeroes and flags; the caller reads it back (which waits for the kernel) and passes it to
// check_status(), which raises the CPU path's ValueError. Without status nothing is checked and
// nothing ever synchronizes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>

#include "common/format.h"
#include "dlpack_view.h"
#include "lowbit_cuda.cuh"

namespace py = pybind11;
using namespace lowbit;

namespace {

void fail(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

DType float_dtype(const ArrayView& v, const char* name) {
  if (v.dtype == "float32") return DType::f32;
  if (v.dtype == "float16") return DType::f16;
  if (v.dtype == "bfloat16") return DType::bf16;
  throw py::type_error(std::string(name) + " must be float32, float16 or bfloat16, got " + v.dtype);
}

// Views the arrays of one call: all must be in GPU memory of one device (the first array's).
class CudaArgs {
 public:
  explicit CudaArgs(int64_t stream) : stream_(stream) {
    if (stream < 0) fail("stream must be a DLPack stream value (1 = legacy default stream), got " +
                         std::to_string(stream));
  }

  ArrayView view(const py::handle& obj, const char* name, bool writable) {
    ArrayView direct;
    const bool is_direct = view_direct(obj, direct);
    int type = direct.device_type, id = direct.device_id;
    if (!is_direct) {
      if (!py::hasattr(obj, "__dlpack_device__") || !py::hasattr(obj, "__dlpack__"))
        throw py::type_error(std::string(name) + " must be a CUDA array (torch tensor or CuPy array)");
      py::tuple dev = obj.attr("__dlpack_device__")();
      type = dev[0].cast<int>();
      id = dev[1].cast<int>();
    }
    if (type != dl::kCUDA && type != dl::kCUDAManaged)
      fail(std::string(name) + " is not in GPU memory (DLPack device type " + std::to_string(type) +
           "); the CUDA kernels take CUDA arrays");
    if (device_ < 0) {
      device_ = id;
      first_ = name;
    } else if (id != device_) {
      fail(std::string(name) + " is on cuda:" + std::to_string(id) + " but " + first_ +
           " is on cuda:" + std::to_string(device_) + "; put them on one device");
    }
    return is_direct ? direct : view_array(obj, name, writable, stream_);
  }

  // A C-contiguous array of exactly this dtype and shape.
  ArrayView exact(const py::handle& obj, const char* name, const std::string& dtype,
                  const std::vector<int64_t>& shape, bool writable) {
    ArrayView v = view(obj, name, writable);
    if (v.dtype != dtype) throw py::type_error(std::string(name) + " must be " + dtype + ", got " + v.dtype);
    if (v.shape != shape)
      fail(std::string(name) + " must have shape " + shape_str(shape) + " but has " + shape_str(v.shape));
    if (!v.contiguous()) fail(std::string(name) + " must be contiguous");
    return v;
  }

  int32_t* status(const py::object& obj) {
    if (obj.is_none()) return nullptr;
    ArrayView v = exact(obj, "status", "int32", {gpu::kStatusWords}, true);
    status_ = v;  // keep the capsule alive for the call
    return static_cast<int32_t*>(v.data);
  }

  gpu::Launch launch() const { return {device_, stream_}; }

 private:
  int64_t stream_;
  int device_ = -1;
  std::string first_;
  ArrayView status_;
};

void check(const std::string& err, const char* op) {
  if (!err.empty()) throw std::runtime_error(std::string("lowbit CUDA ") + op + " failed: " + err);
}

QuantFormat make_format(int bits, int scheme, int64_t group_size, float clip_ratio) {
  if (scheme < 0 || scheme > 2) fail("scheme must be 0 (asymmetric), 1 (symmetric) or 2 (nf4)");
  return QuantFormat{bits, Scheme(scheme), group_size, clip_ratio};
}

// The checks cpp/common/dispatch.cpp applies before a CPU kernel runs.
void validate_format(const QuantFormat& f, int64_t K) {
  if (!(f.bits == 2 || f.bits == 3 || f.bits == 4 || f.bits == 8))
    fail("bits must be 2, 3, 4 or 8, got " + std::to_string(f.bits));
  if (f.scheme == Scheme::nf4 && f.bits != 4) fail("nf4 needs bits=4");
  if (f.group_size <= 0) fail("group_size must be positive, got " + std::to_string(f.group_size));
  if (!(f.group_size == K || f.group_size % 16 == 0))
    fail("group_size must be a multiple of 16 (or the whole row), got " + std::to_string(f.group_size));
  if (!(f.clip_ratio > 0.f && f.clip_ratio <= 1.f)) fail("clip_ratio must be in (0, 1]");
}

void quantize_py(py::handle w, py::handle scales, py::handle zeros, py::handle codes, int bits,
                 int scheme, int64_t group_size, float clip_ratio, bool params_given,
                 int64_t stream, py::object status) {
  CudaArgs args(stream);
  ArrayView wv = args.view(w, "w", false);
  if (wv.shape.size() != 2) fail("w must be 2-D [rows, K], got " + std::to_string(wv.shape.size()) + "-D");
  const int64_t rows = wv.shape[0], K = wv.shape[1];
  if (rows == 0 || K == 0) fail("w is empty");
  if (!wv.row_contiguous()) fail("w must have unit stride along its last axis");
  const DType wt = float_dtype(wv, "w");
  QuantFormat f = make_format(bits, scheme, group_size, clip_ratio);
  if (f.group_size <= 0) fail("group_size must be positive");
  validate_format(f, K);
  const int64_t G = num_groups(K, f.group_size);
  ArrayView sv = args.exact(scales, "scales", "float32", {rows, G}, !params_given);
  ArrayView zv;
  if (f.scheme == Scheme::asymmetric) zv = args.exact(zeros, "zeros", "uint8", {rows, G}, !params_given);
  else if (!zeros.is_none()) fail("zeros are only used by asymmetric formats");
  ArrayView cv = args.exact(codes, "codes", bits == 8 && f.scheme == Scheme::symmetric ? "int8" : "uint8",
                            {rows, packed_row_bytes(K, bits)}, true);
  int32_t* st = args.status(status);
  QuantizeArgs a{wv.data, wt, rows, K, rows > 1 ? wv.strides[0] : K, f, params_given,
                 static_cast<float*>(sv.data), static_cast<uint8_t*>(zv.data),
                 static_cast<uint8_t*>(cv.data)};
  std::string err;
  {
    py::gil_scoped_release nogil;
    err = gpu::quantize(a, st, args.launch());
  }
  check(err, "quantize");
}

void dequantize_py(py::handle codes, py::handle scales, py::handle zeros, py::handle out, int bits,
                   int scheme, int64_t group_size, int64_t stream) {
  CudaArgs args(stream);
  ArrayView ov = args.view(out, "out", true);
  if (ov.shape.size() != 2 || !ov.contiguous()) fail("out must be a contiguous 2-D array");
  const int64_t rows = ov.shape[0], K = ov.shape[1];
  if (rows == 0 || K == 0) fail("codes are empty");
  const DType ot = float_dtype(ov, "out");
  QuantFormat f = make_format(bits, scheme, group_size, 1.0f);
  if (f.group_size <= 0) fail("group_size must be positive");
  validate_format(f, K);
  const int64_t G = num_groups(K, f.group_size);
  ArrayView cv = args.exact(codes, "codes", bits == 8 && f.scheme == Scheme::symmetric ? "int8" : "uint8",
                            {rows, packed_row_bytes(K, bits)}, false);
  ArrayView sv = args.exact(scales, "scales", "float32", {rows, G}, false);
  ArrayView zv;
  if (f.scheme == Scheme::asymmetric) zv = args.exact(zeros, "zeros", "uint8", {rows, G}, false);
  DequantizeArgs a{static_cast<const uint8_t*>(cv.data), static_cast<const float*>(sv.data),
                   static_cast<const uint8_t*>(zv.data), rows, K, f, ov.data, ot};
  std::string err;
  {
    py::gil_scoped_release nogil;
    err = gpu::dequantize(a, args.launch());
  }
  check(err, "dequantize");
}

void pack_int4_py(py::handle codes, py::handle packed, int64_t stream, py::object status) {
  CudaArgs args(stream);
  ArrayView cv = args.view(codes, "codes", false);
  if (cv.dtype != "uint8" && cv.dtype != "int8")
    throw py::type_error("codes must be uint8 or int8, got " + cv.dtype);
  if (cv.shape.size() != 2 || !cv.contiguous()) fail("codes must be a contiguous 2-D array");
  const int64_t rows = cv.shape[0], K = cv.shape[1];
  if (rows == 0 || K == 0) fail("codes is empty");
  ArrayView pv = args.exact(packed, "packed", "uint8", {rows, packed_row_bytes(K, 4)}, true);
  int32_t* st = args.status(status);
  const bool is_signed = cv.dtype == "int8";
  std::string err;
  {
    py::gil_scoped_release nogil;
    err = gpu::pack_int4(static_cast<const uint8_t*>(cv.data), rows, K, is_signed,
                         static_cast<uint8_t*>(pv.data), st, args.launch());
  }
  check(err, "pack_int4");
}

void unpack_int4_py(py::handle packed, py::handle out, int64_t stream) {
  CudaArgs args(stream);
  ArrayView ov = args.view(out, "out", true);
  if (ov.dtype != "uint8" && ov.dtype != "int8") throw py::type_error("out must be uint8 or int8");
  if (ov.shape.size() != 2 || !ov.contiguous()) fail("out must be a contiguous 2-D array");
  const int64_t rows = ov.shape[0], K = ov.shape[1];
  if (rows == 0 || K == 0) fail("packed is empty");
  ArrayView pv = args.exact(packed, "packed", "uint8", {rows, packed_row_bytes(K, 4)}, false);
  const bool sign_extend = ov.dtype == "int8";
  std::string err;
  {
    py::gil_scoped_release nogil;
    err = gpu::unpack_int4(static_cast<const uint8_t*>(pv.data), rows, K, sign_extend,
                           static_cast<uint8_t*>(ov.data), args.launch());
  }
  check(err, "unpack_int4");
}

// status: the two int32 words a checked kernel wrote, read back to the host by the caller.
void check_status_py(const std::vector<int64_t>& status) {
  if (status.size() != size_t(gpu::kStatusWords))
    fail("status must hold " + std::to_string(gpu::kStatusWords) + " values");
  const int64_t flags = status[0];
  if (flags & gpu::kBadScale) fail("scales must be finite and >= 0");
  if (flags & gpu::kBadZero) fail("zeros must be in [0, 2^bits - 1]");
  if (flags & gpu::kNonFinite)
    fail("w contains NaN or Inf (first in row " + std::to_string(INT_MAX - status[1]) + ")");
  if (flags & gpu::kPackRangeSigned) fail("codes must be in [-8, 7] to pack as signed int4");
  if (flags & gpu::kPackRangeUnsigned) fail("codes must be in [0, 15] to pack as int4");
}

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMMs. Packed buffers are int32 arrays (uint32 words) the Python layer allocates and
// caches; x is [M, K] fp16/bf16 with unit stride along K; y, bias, scratch and workspace arrive
// allocated by the caller's framework. Checks here, arithmetic in cuda/*_sm80.cu.

DType half_dtype(const ArrayView& v, const char* name) {
  if (v.dtype == "float16") return DType::f16;
  if (v.dtype == "bfloat16") return DType::bf16;
  throw py::type_error(std::string(name) + " must be float16 or bfloat16 for the CUDA GEMMs, got " + v.dtype);
}

DType dtype_from_name(const std::string& s) {
  if (s == "float16") return DType::f16;
  if (s == "bfloat16") return DType::bf16;
  throw py::type_error("activation dtype must be float16 or bfloat16, got " + s);
}

void check_gemm_dims(int64_t N, int64_t K) {
  if (N <= 0 || K <= 0) fail("N and K must be positive");
  if (N > INT_MAX / 2 || K > INT_MAX / 2) fail("N and K must be below 2^30");
}

void w4a16_prepack_py(py::handle codes, py::handle scales, py::object zeros, py::handle weights,
                      py::handle params, int64_t N, int64_t K, int64_t group_size,
                      const std::string& act_dtype, int64_t stream) {
  CudaArgs args(stream);
  check_gemm_dims(N, K);
  if (group_size <= 0 || !(group_size == K || group_size % 16 == 0))
    fail("group_size must be a multiple of 16 or the whole row, got " + std::to_string(group_size));
  const gpu::W4A16Shape sh{N, K, group_size};
  const int64_t G = num_groups(K, group_size);
  ArrayView cv = args.exact(codes, "codes", "uint8", {N, packed_row_bytes(K, 4)}, false);
  ArrayView sv = args.exact(scales, "scales", "float32", {N, G}, false);
  ArrayView zv;
  if (!zeros.is_none()) zv = args.exact(zeros, "zeros", "uint8", {N, G}, false);
  ArrayView wv = args.exact(weights, "weights", "int32", {sh.weight_words()}, true);
  ArrayView pv = args.exact(params, "params", "int32", {sh.param_words()}, true);
  const DType act = dtype_from_name(act_dtype);
  std::string err;
  {
    py::gil_scoped_release nogil;
    err = gpu::w4a16_prepack(static_cast<const uint8_t*>(cv.data), static_cast<const float*>(sv.data),
                             static_cast<const uint8_t*>(zv.data), sh, act,
                             static_cast<uint32_t*>(wv.data), static_cast<uint32_t*>(pv.data), args.launch());
  }
  check(err, "w4a16_prepack");
}

// x [M, K] and y [M, N] checks shared by both GEMMs; returns (M, x dtype).
std::pair<int64_t, DType> check_x_y(CudaArgs& args, ArrayView& xv, ArrayView& yv, py::handle x,
                                    py::handle y, int64_t N, int64_t K) {
  xv = args.view(x, "x", false);
  if (xv.shape.size() != 2) fail("x must be 2-D [M, K], got " + std::to_string(xv.shape.size()) + "-D");
  const DType xt = half_dtype(xv, "x");
  if (xv.shape[1] != K)
    fail("x has K = " + std::to_string(xv.shape[1]) + " but the weights have K = " + std::to_string(K));
  const int64_t M = xv.shape[0];
  if (M <= 0) fail("x is empty");
  if (M > INT_MAX / 2) fail("x has too many rows");
  if (!xv.row_contiguous()) fail("x must have unit stride along its last axis");
  yv = args.exact(y, "y", xv.dtype, {M, N}, true);
  return {M, xt};
}

const float* bias_ptr(CudaArgs& args, ArrayView& bv, const py::object& bias, int64_t N) {
  if (bias.is_none()) return nullptr;
  bv = args.exact(bias, "bias", "float32", {N}, false);
  return static_cast<const float*>(bv.data);
}

py::tuple plan_tuple(const gpu::GemmPlan& p) { return py::make_tuple(p.splits, p.workspace_words); }

void w4a16_gemm_py(py::handle x, py::handle weights, py::handle params, py::object bias, py::handle y,
                   py::object workspace, int64_t N, int64_t K, int64_t group_size, int64_t stream) {
  CudaArgs args(stream);
  check_gemm_dims(N, K);
  if (group_size <= 0 || !(group_size == K || group_size % 16 == 0))
    fail("group_size must be a multiple of 16 or the whole row, got " + std::to_string(group_size));
  const gpu::W4A16Shape sh{N, K, group_size};
  ArrayView xv, yv, bv, wsv;
  const auto [M, xt] = check_x_y(args, xv, yv, x, y, N, K);
  ArrayView wv = args.exact(weights, "weights", "int32", {sh.weight_words()}, false);
  ArrayView pv = args.exact(params, "params", "int32", {sh.param_words()}, false);
  const float* b = bias_ptr(args, bv, bias, N);
  const gpu::GemmPlan plan = gpu::w4a16_plan(M, N, K, args.launch().device);
  float* ws = nullptr;
  if (plan.splits > 1) {
    if (workspace.is_none()) fail("this shape needs a split-K workspace (see w4a16_plan)");
    wsv = args.view(workspace, "workspace", true);
    if (wsv.dtype != "float32" || !wsv.contiguous() || wsv.numel() < plan.workspace_words)
      fail("workspace must be a contiguous float32 array of at least " +
           std::to_string(plan.workspace_words) + " elements");
    ws = static_cast<float*>(wsv.data);
  }
  gpu::W4A16Args a{xv.data, xt, M, M > 1 ? xv.strides[0] : K, sh,
                   static_cast<const uint32_t*>(wv.data), static_cast<const uint32_t*>(pv.data), b,
                   yv.data, ws};
  std::string err;
  {
    py::gil_scoped_release nogil;
    err = gpu::w4a16_gemm(a, args.launch());
  }
  check(err, "w4a16_gemm");
}

void w8a8_prepack_py(py::handle codes, py::handle scales, py::object zeros, py::handle weights,
                     py::handle params, int64_t N, int64_t K, int64_t stream) {
  CudaArgs args(stream);
  check_gemm_dims(N, K);
  const gpu::W8A8Shape sh{N, K};
  ArrayView cv = args.exact(codes, "codes", zeros.is_none() ? "int8" : "uint8", {N, K}, false);
  ArrayView sv = args.exact(scales, "scales", "float32", {N, 1}, false);
  ArrayView zv;
  if (!zeros.is_none()) zv = args.exact(zeros, "zeros", "uint8", {N, 1}, false);
  ArrayView wv = args.exact(weights, "weights", "int32", {sh.weight_words()}, true);
  ArrayView pv = args.exact(params, "params", "int32", {sh.param_words()}, true);
  std::string err;
  {
    py::gil_scoped_release nogil;
    err = gpu::w8a8_prepack(cv.data, static_cast<const float*>(sv.data), static_cast<const uint8_t*>(zv.data),
                            sh, static_cast<uint32_t*>(wv.data), static_cast<uint32_t*>(pv.data), args.launch());
  }
  check(err, "w8a8_prepack");
}

void w8a8_gemm_py(py::handle x, py::handle weights, py::handle params, py::object bias, py::handle y,
                  py::handle xq, py::handle x_scale, py::handle x_sum, py::object workspace, int64_t N,
                  int64_t K, int64_t stream) {
  CudaArgs args(stream);
  check_gemm_dims(N, K);
  const gpu::W8A8Shape sh{N, K};
  ArrayView xv, yv, bv, wsv;
  const auto [M, xt] = check_x_y(args, xv, yv, x, y, N, K);
  ArrayView wv = args.exact(weights, "weights", "int32", {sh.weight_words()}, false);
  ArrayView pv = args.exact(params, "params", "int32", {sh.param_words()}, false);
  ArrayView qv = args.exact(xq, "xq", "int8", {M, sh.act_row_bytes()}, true);
  ArrayView sv = args.exact(x_scale, "x_scale", "float32", {M}, true);
  ArrayView mv = args.exact(x_sum, "x_sum", "int32", {M}, true);
  const float* b = bias_ptr(args, bv, bias, N);
  const gpu::GemmPlan plan = gpu::w8a8_plan(M, N, K, args.launch().device);
  int32_t* ws = nullptr;
  if (plan.splits > 1) {
    if (workspace.is_none()) fail("this shape needs a split-K workspace (see w8a8_plan)");
    wsv = args.view(workspace, "workspace", true);
    if (wsv.dtype != "int32" || !wsv.contiguous() || wsv.numel() < plan.workspace_words)
      fail("workspace must be a contiguous int32 array of at least " +
           std::to_string(plan.workspace_words) + " elements");
    ws = static_cast<int32_t*>(wsv.data);
  }
  gpu::W8A8Args a{xv.data, xt, M, M > 1 ? xv.strides[0] : K, sh,
                  static_cast<const uint32_t*>(wv.data), static_cast<const uint32_t*>(pv.data), b,
                  yv.data, static_cast<int8_t*>(qv.data), static_cast<float*>(sv.data),
                  static_cast<int32_t*>(mv.data), ws};
  std::string err;
  {
    py::gil_scoped_release nogil;
    err = gpu::w8a8_gemm(a, args.launch());
  }
  check(err, "w8a8_gemm");
}

py::dict build_info_py() {
  gpu::RuntimeInfo r;
  {
    py::gil_scoped_release nogil;
    r = gpu::runtime_info();
  }
  auto version = [](int v) {
    return v ? std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10) : std::string();
  };
  py::dict d;
  d["arch_targets"] = r.arch_targets;
  d["arch_list"] = r.arch_list;
  d["cuda_runtime_version"] = version(r.runtime_version);
  d["cuda_build_version"] = version(r.build_version);
  d["cudart"] = "static";
  d["driver_version"] = r.driver_version ? py::object(py::str(version(r.driver_version))) : py::none();
  py::list devs;
  for (const auto& dv : r.devices) {
    py::dict e;
    e["index"] = dv.index;
    e["name"] = dv.name;
    e["compute_capability"] = std::to_string(dv.cc_major) + "." + std::to_string(dv.cc_minor);
    e["sm_count"] = dv.sm_count;
    e["total_memory"] = dv.total_memory;
    devs.append(e);
  }
  d["devices"] = devs;
  if (!r.error.empty()) d["device_error"] = r.error;
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "lowbit CUDA kernels (internal; use the lowbit package API)";
  m.def("quantize", &quantize_py, py::arg("w"), py::arg("scales"), py::arg("zeros"), py::arg("codes"),
        py::arg("bits"), py::arg("scheme"), py::arg("group_size"), py::arg("clip_ratio"),
        py::arg("params_given"), py::kw_only(), py::arg("stream") = 1, py::arg("status") = py::none());
  m.def("dequantize", &dequantize_py, py::arg("codes"), py::arg("scales"), py::arg("zeros"),
        py::arg("out"), py::arg("bits"), py::arg("scheme"), py::arg("group_size"), py::kw_only(),
        py::arg("stream") = 1);
  m.def("pack_int4", &pack_int4_py, py::arg("codes"), py::arg("packed"), py::kw_only(),
        py::arg("stream") = 1, py::arg("status") = py::none());
  m.def("unpack_int4", &unpack_int4_py, py::arg("packed"), py::arg("out"), py::kw_only(),
        py::arg("stream") = 1);
  m.def("check_status", &check_status_py, py::arg("status"),
        "raise the CPU path's ValueError for what a checked kernel flagged in its status buffer");
  m.attr("STATUS_WORDS") = gpu::kStatusWords;

  m.def("w4a16_prepack", &w4a16_prepack_py, py::arg("codes"), py::arg("scales"), py::arg("zeros"),
        py::arg("weights"), py::arg("params"), py::arg("N"), py::arg("K"), py::arg("group_size"),
        py::arg("act_dtype"), py::kw_only(), py::arg("stream") = 1);
  m.def("w4a16_sizes", [](int64_t N, int64_t K, int64_t group_size) {
          const gpu::W4A16Shape s{N, K, group_size};
          return py::make_tuple(s.weight_words(), s.param_words());
        }, py::arg("N"), py::arg("K"), py::arg("group_size"),
        "(weight words, param words) of the packed W4A16 layout");
  m.def("w4a16_plan", [](int64_t M, int64_t N, int64_t K, int device) {
          return plan_tuple(gpu::w4a16_plan(M, N, K, device));
        }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("device"),
        "(split-K slices, float32 workspace elements; 0 when none is needed)");
  m.def("w4a16_gemm", &w4a16_gemm_py, py::arg("x"), py::arg("weights"), py::arg("params"),
        py::arg("bias"), py::arg("y"), py::arg("workspace"), py::arg("N"), py::arg("K"),
        py::arg("group_size"), py::kw_only(), py::arg("stream") = 1);
  m.def("w8a8_prepack", &w8a8_prepack_py, py::arg("codes"), py::arg("scales"), py::arg("zeros"),
        py::arg("weights"), py::arg("params"), py::arg("N"), py::arg("K"), py::kw_only(),
        py::arg("stream") = 1);
  m.def("w8a8_sizes", [](int64_t N, int64_t K) {
          const gpu::W8A8Shape s{N, K};
          return py::make_tuple(s.weight_words(), s.param_words(), s.act_row_bytes());
        }, py::arg("N"), py::arg("K"),
        "(weight words, param words, quantized activation row bytes) of the W8A8 layout");
  m.def("w8a8_plan", [](int64_t M, int64_t N, int64_t K, int device) {
          return plan_tuple(gpu::w8a8_plan(M, N, K, device));
        }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("device"),
        "(split-K slices, int32 workspace elements; 0 when none is needed)");
  m.def("w8a8_gemm", &w8a8_gemm_py, py::arg("x"), py::arg("weights"), py::arg("params"),
        py::arg("bias"), py::arg("y"), py::arg("xq"), py::arg("x_scale"), py::arg("x_sum"),
        py::arg("workspace"), py::arg("N"), py::arg("K"), py::kw_only(), py::arg("stream") = 1);
  m.attr("W4A16_LAYOUT") = py::make_tuple(gpu::kW4A16Layout, gpu::kW4A16LayoutVersion);
  m.attr("W8A8_LAYOUT") = py::make_tuple(gpu::kW8A8Layout, gpu::kW8A8LayoutVersion);
  m.def("build_info", &build_info_py,
        "compiled architectures, CUDA runtime/driver versions and devices; never raises "
        "(a missing driver or device is reported under 'device_error')");
}
