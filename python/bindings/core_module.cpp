// lowbit._core: the CPU extension. Validates arguments, unwraps DLPack views, releases the GIL
// and calls the dispatcher. No arithmetic here. Outputs are allocated by the caller's framework
// (Python side) and passed in, so every array lives in the caller's allocator.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/numpy.h>

#include "common/dispatch.h"
#include "common/format.h"
#include "common/peak.h"
#include "dlpack_view.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace py = pybind11;
using namespace lowbit;

namespace {

void fail(const std::string& msg) { throw py::value_error(msg); }

DType float_dtype(const ArrayView& v, const char* name) {
  if (v.dtype == "float32") return DType::f32;
  if (v.dtype == "float16") return DType::f16;
  if (v.dtype == "bfloat16") return DType::bf16;
  throw py::type_error(std::string(name) + " must be float32, float16 or bfloat16, got " + v.dtype);
}

void require_cpu(const ArrayView& v, const char* name) {
  if (v.device_type != dl::kCPU && v.device_type != dl::kCUDAHost)
    fail(std::string(name) + " is not in CPU memory (DLPack device type " +
         std::to_string(v.device_type) + "); the CPU kernels take CPU arrays");
}

// A C-contiguous CPU array of exactly this dtype and shape.
ArrayView view_exact(const py::handle& obj, const char* name, const std::string& dtype,
                     std::vector<int64_t> shape, bool writable) {
  ArrayView v = view_array(obj, name, writable);
  require_cpu(v, name);
  if (v.dtype != dtype) throw py::type_error(std::string(name) + " must be " + dtype + ", got " + v.dtype);
  if (v.shape != shape) {
    std::string want, got;
    for (auto s : shape) want += std::to_string(s) + ",";
    for (auto s : v.shape) got += std::to_string(s) + ",";
    fail(std::string(name) + " must have shape (" + want + ") but has (" + got + ")");
  }
  if (!v.contiguous()) fail(std::string(name) + " must be contiguous");
  return v;
}

QuantFormat make_format(int bits, int scheme, int64_t group_size, float clip_ratio) {
  if (scheme < 0 || scheme > 2) fail("scheme must be 0 (asymmetric), 1 (symmetric) or 2 (nf4)");
  return QuantFormat{bits, Scheme(scheme), group_size, clip_ratio};
}

void quantize_py(py::handle w, py::handle scales, py::handle zeros, py::handle codes, int bits,
                 int scheme, int64_t group_size, float clip_ratio, bool params_given) {
  ArrayView wv = view_array(w, "w", false);
  require_cpu(wv, "w");
  if (wv.shape.size() != 2) fail("w must be 2-D [rows, K], got " + std::to_string(wv.shape.size()) + "-D");
  const int64_t rows = wv.shape[0], K = wv.shape[1];
  if (rows == 0 || K == 0) fail("w is empty");
  if (!wv.row_contiguous()) fail("w must have unit stride along its last axis");
  QuantFormat f = make_format(bits, scheme, group_size, clip_ratio);
  if (f.group_size <= 0) fail("group_size must be positive");
  const int64_t G = num_groups(K, f.group_size);
  ArrayView sv = view_exact(scales, "scales", "float32", {rows, G}, !params_given);
  ArrayView zv;
  if (f.scheme == Scheme::asymmetric) zv = view_exact(zeros, "zeros", "uint8", {rows, G}, !params_given);
  else if (!zeros.is_none()) fail("zeros are only used by asymmetric formats");
  ArrayView cv = view_exact(codes, "codes", bits == 8 && f.scheme == Scheme::symmetric ? "int8" : "uint8",
                            {rows, packed_row_bytes(K, bits)}, true);
  QuantizeArgs a{wv.data, float_dtype(wv, "w"), rows, K, rows > 1 ? wv.strides[0] : K, f,
                 params_given, static_cast<float*>(sv.data),
                 static_cast<uint8_t*>(zv.data), static_cast<uint8_t*>(cv.data)};
  py::gil_scoped_release nogil;
  lowbit::quantize(a);
}

void dequantize_py(py::handle codes, py::handle scales, py::handle zeros, py::handle out, int bits,
                   int scheme, int64_t group_size) {
  ArrayView ov = view_array(out, "out", true);
  require_cpu(ov, "out");
  if (ov.shape.size() != 2 || !ov.contiguous()) fail("out must be a contiguous 2-D array");
  const int64_t rows = ov.shape[0], K = ov.shape[1];
  QuantFormat f = make_format(bits, scheme, group_size, 1.0f);
  if (f.group_size <= 0) fail("group_size must be positive");
  const int64_t G = num_groups(K, f.group_size);
  ArrayView cv = view_exact(codes, "codes", bits == 8 && f.scheme == Scheme::symmetric ? "int8" : "uint8",
                            {rows, packed_row_bytes(K, bits)}, false);
  ArrayView sv = view_exact(scales, "scales", "float32", {rows, G}, false);
  ArrayView zv;
  if (f.scheme == Scheme::asymmetric) zv = view_exact(zeros, "zeros", "uint8", {rows, G}, false);
  DequantizeArgs a{static_cast<const uint8_t*>(cv.data), static_cast<const float*>(sv.data),
                   static_cast<const uint8_t*>(zv.data), rows, K, f, ov.data, float_dtype(ov, "out")};
  py::gil_scoped_release nogil;
  lowbit::dequantize(a);
}

void gptq_columns_py(py::handle w, py::handle q, py::handle err, py::handle u, int64_t begin,
                     int64_t end, py::handle scales, py::handle zeros, int bits, int scheme) {
  ArrayView wv = view_array(w, "w", true);
  require_cpu(wv, "w");
  if (wv.dtype != "float32") throw py::type_error("w must be float32, got " + wv.dtype);
  if (wv.shape.size() != 2 || !wv.contiguous()) fail("w must be a contiguous 2-D array [B, N]");
  const int64_t B = wv.shape[0], N = wv.shape[1];
  ArrayView qv = view_exact(q, "q", "float32", {B, N}, true);
  ArrayView ev = view_exact(err, "err", "float32", {B, N}, true);
  ArrayView uv = view_exact(u, "u", "float32", {B, B}, false);
  if (!(0 <= begin && begin < end && end <= B)) fail("columns [begin, end) must lie inside the block");
  QuantFormat f = make_format(bits, scheme, 1, 1.0f);
  ArrayView probe = view_array(scales, "scales", false);
  const bool per_column = probe.shape.size() == 2;
  std::vector<int64_t> pshape = per_column ? std::vector<int64_t>{end - begin, N} : std::vector<int64_t>{N};
  ArrayView sv = view_exact(scales, "scales", "float32", pshape, false);
  ArrayView zv;
  if (f.scheme == Scheme::asymmetric) zv = view_exact(zeros, "zeros", "uint8", pshape, false);
  else if (!zeros.is_none()) fail("zeros are only used by asymmetric formats");
  GptqColumnsCall c{static_cast<float*>(wv.data), static_cast<float*>(qv.data),
                    static_cast<float*>(ev.data), static_cast<const float*>(uv.data), B, N, begin, end, f,
                    static_cast<const float*>(sv.data), static_cast<const uint8_t*>(zv.data), per_column};
  py::gil_scoped_release nogil;
  lowbit::gptq_columns(c);
}

void gram_update_py(py::handle h, py::handle x) {
  ArrayView xv = view_array(x, "x", false);
  require_cpu(xv, "x");
  if (xv.dtype != "float32") throw py::type_error("x must be float32, got " + xv.dtype);
  if (xv.shape.size() != 2 || !xv.row_contiguous()) fail("x must be a 2-D array [m, K] with contiguous rows");
  const int64_t m = xv.shape[0], K = xv.shape[1];
  if (K == 0) fail("x has no columns");
  ArrayView hv = view_exact(h, "h", "float32", {K, K}, true);
  GramCall c{static_cast<const float*>(xv.data), m, K, m > 1 ? xv.strides[0] : K,
             static_cast<float*>(hv.data), K};
  py::gil_scoped_release nogil;
  lowbit::gram_update(c);
}

void clip_search_py(py::handle w, py::handle ratios, py::handle col_weight, py::handle scales,
                    py::handle zeros, py::handle best_ratio, int bits, int scheme, int64_t group_size) {
  ArrayView wv = view_array(w, "w", false);
  require_cpu(wv, "w");
  if (wv.dtype != "float32") throw py::type_error("w must be float32, got " + wv.dtype);
  if (wv.shape.size() != 2 || !wv.contiguous()) fail("w must be a contiguous 2-D array [rows, K]");
  const int64_t rows = wv.shape[0], K = wv.shape[1];
  if (rows == 0 || K == 0) fail("w is empty");
  if (group_size <= 0) fail("group_size must be positive");
  QuantFormat f = make_format(bits, scheme, group_size, 1.0f);
  const int64_t G = num_groups(K, f.group_size);
  ArrayView rv = view_array(ratios, "ratios", false);
  if (rv.dtype != "float32" || rv.shape.size() != 1 || !rv.contiguous()) fail("ratios must be a contiguous 1-D float32 array");
  ArrayView cv;
  if (!col_weight.is_none()) cv = view_exact(col_weight, "col_weight", "float32", {K}, false);
  ArrayView sv = view_exact(scales, "scales", "float32", {rows, G}, true);
  ArrayView bv = view_exact(best_ratio, "best_ratio", "float32", {rows, G}, true);
  ArrayView zv;
  if (f.scheme == Scheme::asymmetric) zv = view_exact(zeros, "zeros", "uint8", {rows, G}, true);
  else if (!zeros.is_none()) fail("zeros are only used by asymmetric formats");
  ClipSearchCall c{static_cast<const float*>(wv.data), rows, K, f, static_cast<const float*>(rv.data),
                   rv.shape[0], static_cast<const float*>(cv.data), static_cast<float*>(sv.data),
                   static_cast<uint8_t*>(zv.data), static_cast<float*>(bv.data)};
  py::gil_scoped_release nogil;
  lowbit::clip_search(c);
}

void pack_int4_py(py::handle codes, py::handle packed) {
  ArrayView cv = view_array(codes, "codes", false);
  require_cpu(cv, "codes");
  if (cv.dtype != "uint8" && cv.dtype != "int8")
    throw py::type_error("codes must be uint8 or int8, got " + cv.dtype);
  if (cv.shape.size() != 2 || !cv.contiguous()) fail("codes must be a contiguous 2-D array");
  const int64_t rows = cv.shape[0], K = cv.shape[1];
  if (rows == 0 || K == 0) fail("codes is empty");
  ArrayView pv = view_exact(packed, "packed", "uint8", {rows, packed_row_bytes(K, 4)}, true);
  const bool is_signed = cv.dtype == "int8";
  py::gil_scoped_release nogil;
  lowbit::pack_int4(static_cast<const uint8_t*>(cv.data), rows, K, is_signed,
                    static_cast<uint8_t*>(pv.data));
}

void unpack_int4_py(py::handle packed, py::handle codes) {
  ArrayView cv = view_array(codes, "out", true);
  require_cpu(cv, "out");
  if (cv.dtype != "uint8" && cv.dtype != "int8") throw py::type_error("out must be uint8 or int8");
  if (cv.shape.size() != 2 || !cv.contiguous()) fail("out must be a contiguous 2-D array");
  const int64_t rows = cv.shape[0], K = cv.shape[1];
  if (rows == 0 || K == 0) fail("packed is empty");
  ArrayView pv = view_exact(packed, "packed", "uint8", {rows, packed_row_bytes(K, 4)}, false);
  const bool sign_extend = cv.dtype == "int8";
  py::gil_scoped_release nogil;
  lowbit::unpack_int4(static_cast<const uint8_t*>(pv.data), rows, K, sign_extend,
                      static_cast<uint8_t*>(cv.data));
}

// The buffer of a packed weight, 64-byte aligned (numpy only promises 16): the header is 128
// bytes, so each 64-byte W4Block is then exactly one cache line, as the layout intends. Decode
// streams the whole weight from DRAM once per token, so on Linux a weight of 2 MiB or more gets a
// mapping of its own, 2 MiB aligned and advised into transparent huge pages (MADV_HUGEPAGE; the
// advice is ignored where THP is off). A numpy buffer got huge pages only inside its unaligned
// ends (14 of 16 MiB), or none where malloc reused freed memory, and its last pages hold the
// scales and zeros, streams of their own. K = N = 4096, 1 thread, Zen 4 VM, weights from DRAM, 5
// alternating builds, median GB/s, numpy buffer -> own mapping: int4 g128 27.6 -> 31.8, int8 per
// channel 28.0 -> 31.9, int4 g32 29.3 -> 30.1; int8 M = 2 / 4, min ms: 0.594 / 0.668 -> 0.540 / 0.636.
py::array_t<uint8_t> packed_buffer(int64_t bytes) {
#if defined(__linux__)
  constexpr size_t kHugePage = size_t(2) << 20;
  if (bytes >= int64_t(kHugePage)) {
    const size_t len = (size_t(bytes) + 4095) & ~size_t(4095);
    void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      const uintptr_t lo = reinterpret_cast<uintptr_t>(raw), hi = lo + len + kHugePage;
      const uintptr_t start = (lo + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
      if (start > lo) munmap(raw, start - lo);  // keep exactly [start, start + len)
      if (hi > start + len) munmap(reinterpret_cast<void*>(start + len), hi - start - len);
      madvise(reinterpret_cast<void*>(start), len, MADV_HUGEPAGE);
      struct Mapping { void* p; size_t len; };
      py::capsule owner(new Mapping{reinterpret_cast<void*>(start), len}, [](void* m) {
        munmap(static_cast<Mapping*>(m)->p, static_cast<Mapping*>(m)->len);
        delete static_cast<Mapping*>(m);
      });
      return py::array_t<uint8_t>({py::ssize_t(bytes)}, {py::ssize_t(1)}, reinterpret_cast<uint8_t*>(start), owner);
    }
  }
#endif
  py::array_t<uint8_t> base(bytes + 63);
  const auto addr = reinterpret_cast<uintptr_t>(base.mutable_data());
  const py::ssize_t off = py::ssize_t((64 - addr % 64) % 64);
  return base[py::slice(off, off + bytes, 1)].cast<py::array_t<uint8_t>>();
}

py::array_t<uint8_t> pack_linear_py(py::handle codes, py::handle scales, py::handle zeros, int64_t N,
                                    int64_t K, int bits, int scheme, int64_t group_size) {
  QuantFormat f = make_format(bits, scheme, group_size, 1.0f);
  if (f.group_size <= 0) fail("group_size must be positive");
  const int64_t G = num_groups(K, f.group_size);
  ArrayView cv = view_exact(codes, "codes", bits == 8 && f.scheme == Scheme::symmetric ? "int8" : "uint8",
                            {N, packed_row_bytes(K, bits)}, false);
  ArrayView sv = view_exact(scales, "scales", "float32", {N, G}, false);
  ArrayView zv;
  if (f.scheme == Scheme::asymmetric) zv = view_exact(zeros, "zeros", "uint8", {N, G}, false);
  int64_t bytes = 0;
  try {
    if (bits != 4 && bits != 8) fail("matmul kernels take 4- or 8-bit weights");
    bytes = packed_linear_bytes(N, K, f);
  } catch (const std::invalid_argument& e) { fail(e.what()); }
  py::array_t<uint8_t> out = packed_buffer(bytes);
  uint8_t* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    lowbit::pack_linear(static_cast<const uint8_t*>(cv.data), static_cast<const float*>(sv.data),
                        static_cast<const uint8_t*>(zv.data), N, K, f, o, bytes);
  }
  return out;
}

void matmul_py(py::handle x, py::array_t<uint8_t, py::array::c_style> packed, py::handle bias,
               py::handle y, int act_bits, bool act_per_block) {
  ArrayView xv = view_array(x, "x", false);
  require_cpu(xv, "x");
  if (xv.shape.size() != 2 || !xv.contiguous()) fail("x must be a contiguous 2-D array [M, K]");
  const DType t = float_dtype(xv, "x");
  const int64_t M = xv.shape[0], K = xv.shape[1];
  if (M == 0 || K == 0) fail("x is empty");
  if (packed.size() < int64_t(sizeof(PackedLinearHeader))) fail("packed weight is too small");
  const int64_t N = reinterpret_cast<const PackedLinearHeader*>(packed.data())->N;
  ArrayView bv;
  if (!bias.is_none()) bv = view_exact(bias, "bias", xv.dtype, {N}, false);
  ArrayView yv = view_exact(y, "out", xv.dtype, {M, N}, true);
  MatmulCall c{xv.data, t, M, K, packed.data(), int64_t(packed.size()), bv.data, yv.data, act_bits,
               act_per_block};
  py::gil_scoped_release nogil;
  lowbit::matmul(c);
}

py::dict build_info_py() {
  py::dict d;
  py::list vs;
  for (const auto& v : variants()) {
    py::dict e;
    e["name"] = v.table->name;
    e["runnable"] = v.runnable;
    if (!v.runnable) e["reason"] = v.missing;
    vs.append(e);
  }
  d["cpu_variants"] = vs;
  d["cpu_features"] = cpu_features().names();
  d["cpu_isa"] = active_isa();
  d["num_threads"] = get_num_threads();
  d["thread_runtime"] = thread_runtime();
  return d;
}

void set_isa_py(const std::string& name) {
  try {
    set_isa(name);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lowbit CPU kernels (internal; use the lowbit package API)";
  m.def("quantize", &quantize_py, py::arg("w"), py::arg("scales"), py::arg("zeros"), py::arg("codes"),
        py::arg("bits"), py::arg("scheme"), py::arg("group_size"), py::arg("clip_ratio"),
        py::arg("params_given"));
  m.def("dequantize", &dequantize_py, py::arg("codes"), py::arg("scales"), py::arg("zeros"),
        py::arg("out"), py::arg("bits"), py::arg("scheme"), py::arg("group_size"));
  m.def("gptq_columns", &gptq_columns_py, py::arg("w"), py::arg("q"), py::arg("err"), py::arg("u"),
        py::arg("begin"), py::arg("end"), py::arg("scales"), py::arg("zeros"), py::arg("bits"),
        py::arg("scheme"));
  m.def("clip_search", &clip_search_py, py::arg("w"), py::arg("ratios"), py::arg("col_weight"),
        py::arg("scales"), py::arg("zeros"), py::arg("best_ratio"), py::arg("bits"), py::arg("scheme"),
        py::arg("group_size"));
  m.def("gram_update", &gram_update_py, py::arg("h"), py::arg("x"));
  m.def("pack_int4", &pack_int4_py, py::arg("codes"), py::arg("packed"));
  m.def("unpack_int4", &unpack_int4_py, py::arg("packed"), py::arg("out"));
  m.def("group_params", [](int bits, int scheme, float clip_ratio, float lo, float hi, float amax) {
    QuantFormat f = make_format(bits, scheme, 16, clip_ratio);
    GroupParams p = params_from_range(f, lo, hi, amax);
    return py::make_tuple(p.scale, int(p.zero));
  }, "scale and zero of one group from its range, by the kernels' rule");
  m.def("pack_linear", &pack_linear_py, py::arg("codes"), py::arg("scales"), py::arg("zeros"),
        py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("scheme"), py::arg("group_size"),
        "prepack a quantized weight into layout panel4_k32 (a uint8 buffer)");
  m.def("matmul", &matmul_py, py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("out"),
        py::arg("act_bits"), py::arg("act_per_block") = false);
  m.def("matmul_kernel", [](py::array_t<uint8_t, py::array::c_style> packed, int act_bits, bool act_per_block) {
    return matmul_kernel_name(packed.data(), act_bits, act_per_block);
  }, "which variant:mode matmul would run", py::arg("packed"), py::arg("act_bits"),
        py::arg("act_per_block") = false);
  m.def("packed_layout", [] { return py::make_tuple("panel4_k32", int(kPanel4Version)); });
  m.def("microbench", [](const std::string& kind, py::object arg, int reps) -> double {
    const CpuFeatures& f = cpu_features();
    auto need = [](const char* variant, bool extra, const char* what) {
      bool ok = false;
      for (const auto& v : variants()) ok |= v.runnable && std::string(v.table->name) == variant;
      if (!ok || !extra) fail(std::string("microbenchmark ") + what + " needs the " + variant + " variant runnable here");
    };
    if (kind == "read") {
      need("avx2", true, "read");
      py::array_t<uint8_t, py::array::c_style> buf = arg.cast<py::array_t<uint8_t, py::array::c_style>>();
      const uint8_t* p = buf.data();
      int64_t n = buf.size();
      if (reps < 1) throw py::value_error("reps must be >= 1");
      py::gil_scoped_release nogil;
      return avx2::peak_read_gbps(p, n, reps);
    }
    const int64_t iters = arg.cast<int64_t>();
    if (iters < 1) throw py::value_error("iterations must be >= 1");
    using Fn = double (*)(int64_t);
    Fn fn = nullptr;
    if (kind == "fma") { need("avx2", true, "fma"); fn = avx2::peak_fma_gflops; }
    else if (kind == "int8") { need("avx2", true, "int8"); fn = avx2::peak_int8_gops; }
    else if (kind == "int8_exact") { need("avx2", true, "int8_exact"); fn = avx2::peak_int8_exact_gops; }
#ifdef LOWBIT_HAVE_AVX2_VNNI
    else if (kind == "vnni256") { need("avx2_vnni", true, "vnni256"); fn = avx2::peak_vnni256_gops; }
#endif
    else if (kind == "fma512") { need("avx512", true, "fma512"); fn = avx512::peak_fma512_gflops; }
    else if (kind == "vnni512") { need("avx512", true, "vnni512"); fn = avx512::peak_vnni512_gops; }
    else if (kind == "bf16dot512") { need("avx512", f.avx512bf16, "bf16dot512 (avx512_bf16)"); fn = avx512::peak_bf16dot512_gflops; }
#ifdef LOWBIT_HAVE_AMX
    else if (kind == "amx_int8") { need("amx", true, "amx_int8"); fn = amx::peak_amx_int8_gops; }
    else if (kind == "amx_bf16") { need("amx", f.amx_bf16, "amx_bf16"); fn = amx::peak_amx_bf16_gflops; }
#endif
    else throw py::value_error("microbench kind must be read, fma, int8, int8_exact, vnni256, fma512, vnni512, bf16dot512,"
                               " amx_int8 or amx_bf16 (vnni256 and the last five where this build has the variant)");
    py::gil_scoped_release nogil;
    return fn(iters);
  }, py::arg("kind"), py::arg("arg"), py::arg("reps") = 5,
        "machine limits: read GB/s (best of reps passes over arg); the others take an iteration count:"
        " fp32 FMA GFLOP/s (fma: ymm, fma512: zmm), int8 dot GOP/s (int8: vpmaddubsw, int8_exact: the exact"
        " s8×s8 sign trick with vpmaddwd, vnni256 / vnni512:"
        " vpdpbusd ymm / zmm, amx_int8: tdpbusd), bf16 dot GFLOP/s (bf16dot512: vdpbf16ps, amx_bf16: tdpbf16ps)");
  m.def("build_info", &build_info_py);
  m.def("set_isa", &set_isa_py, py::arg("name"));
  m.def("get_isa", [] { return active_isa(); });
  m.def("set_num_threads", &set_num_threads);  // std::invalid_argument -> ValueError
  m.def("get_num_threads", &get_num_threads);
}
