// Runtime ISA selection, the thread pool, and the validated kernel entry points.
#include "common/dispatch.h"

#include <cpuid.h>
#include <dlfcn.h>
#include <link.h>
#include <emmintrin.h>  // _mm_pause
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

namespace lowbit {

// ---------------------------------------------------------------------------------------------
// CPU features

static uint64_t read_xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

// Linux hands out the AMX tile-data state only after the process asks for it.
static bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

static CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (__get_cpuid(0, &a, &b, &c, &d)) f.amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  f.fma = (c >> 12) & 1;
  f.f16c = (c >> 29) & 1;
  uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  f.os_ymm = (xcr0 & 0x6) == 0x6;
  f.os_zmm = f.os_ymm && (xcr0 & 0xE0) == 0xE0;
  if (__get_cpuid_max(0, nullptr) >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = (b >> 5) & 1;
    f.avx512f = (b >> 16) & 1;
    f.avx512dq = (b >> 17) & 1;
    f.avx512bw = (b >> 30) & 1;
    f.avx512vl = (b >> 31) & 1;
    f.avx512vnni = (c >> 11) & 1;
    f.amx_bf16 = (d >> 22) & 1;
    f.amx_tile = (d >> 24) & 1;
    f.amx_int8 = (d >> 25) & 1;
    __cpuid_count(7, 1, a, b, c, d);
    f.avx_vnni = (a >> 4) & 1;
    f.avx512bf16 = (a >> 5) & 1;
  }
  f.os_amx = f.amx_tile && (xcr0 & 0x60000) == 0x60000 && request_amx_permission();
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

std::vector<std::string> CpuFeatures::names() const {
  std::vector<std::string> out;
  auto add = [&](bool on, const char* n) { if (on) out.emplace_back(n); };
  add(avx2, "avx2"); add(fma, "fma"); add(f16c, "f16c"); add(avx_vnni, "avx_vnni");
  add(avx512f, "avx512f"); add(avx512bw, "avx512bw"); add(avx512vl, "avx512vl");
  add(avx512dq, "avx512dq"); add(avx512vnni, "avx512vnni"); add(avx512bf16, "avx512bf16");
  add(amx_tile, "amx_tile"); add(amx_int8, "amx_int8"); add(amx_bf16, "amx_bf16");
  add(os_ymm, "os:ymm"); add(os_zmm, "os:zmm"); add(os_amx, "os:amx");
  return out;
}

// ---------------------------------------------------------------------------------------------
// Variant table

static std::string missing_for_avx2(const CpuFeatures& f) {
  std::string m;
  if (!f.avx2) m += " avx2";
  if (!f.fma) m += " fma";
  if (!f.f16c) m += " f16c";
  if (!f.os_ymm) m += " os-ymm-state";
  return m;
}

[[maybe_unused]] static std::string missing_for_avx2_vnni(const CpuFeatures& f) {
  std::string m = missing_for_avx2(f);
  if (!f.avx_vnni) m += " avx_vnni";
  return m;
}

static std::string missing_for_avx512(const CpuFeatures& f) {
  std::string m = missing_for_avx2(f);
  if (!f.avx512f) m += " avx512f";
  if (!f.avx512bw) m += " avx512bw";
  if (!f.avx512vl) m += " avx512vl";
  if (!f.avx512dq) m += " avx512dq";
  if (!f.avx512vnni) m += " avx512vnni";
  if (!f.os_zmm) m += " os-zmm-state";
  return m;
}

static std::string missing_for_amx(const CpuFeatures& f) {
  std::string m = missing_for_avx512(f);
  if (!f.amx_tile) m += " amx_tile";
  if (!f.amx_int8) m += " amx_int8";
  if (!f.os_amx) m += " os-amx-tile-state";
  return m;
}

std::vector<VariantInfo> variants() {
  const CpuFeatures& f = cpu_features();
  std::vector<VariantInfo> v;
  auto add = [&](const KernelTable* t, std::string missing) {
    v.push_back({t, true, missing.empty(), missing.empty() ? "" : "CPU lacks" + missing});
  };
#ifdef LOWBIT_HAVE_AMX
  add(&amx::kTable, missing_for_amx(f));
#endif
  add(&avx512::kTable, missing_for_avx512(f));
#ifdef LOWBIT_HAVE_AVX2_VNNI
  add(&avx2_vnni::kTable, missing_for_avx2_vnni(f));
#endif
  add(&avx2::kTable, missing_for_avx2(f));
#ifdef LOWBIT_HAVE_AVX512_EMULATED
  add(&avx512_emulated::kTable, missing_for_avx2(f));
#endif
  add(&amx_emulated::kTable, missing_for_avx512(f));
  add(&avx2_vnni_emulated::kTable, missing_for_avx512(f));
  add(&ref::kTable, "");
  return v;
}

namespace {
std::mutex g_isa_mutex;

// The test-only builds, which "auto" never picks: the AVX-512 sources on SIMDe, the AMX kernels on
// a scalar model of the tiles, the AVX-VNNI kernels on vpdpbusd's AVX-512VL encoding.
bool test_only(const KernelTable* t) {
  return t == &avx512_emulated::kTable || t == &amx_emulated::kTable || t == &avx2_vnni_emulated::kTable;
}
std::atomic<const KernelTable*> g_active{nullptr};

const KernelTable* select(const std::string& name) {
  auto all = variants();
  if (name.empty() || name == "auto") {
    for (auto& v : all)
      if (v.runnable && !test_only(v.table)) return v.table;
    return &ref::kTable;
  }
  std::string known;
  for (auto& v : all) {
    if (name == v.table->name) {
      if (!v.runnable)
        throw std::invalid_argument("lowbit ISA '" + name + "' cannot run here: " + v.missing);
      return v.table;
    }
    known += std::string(known.empty() ? "" : ", ") + v.table->name;
  }
  throw std::invalid_argument("unknown lowbit ISA '" + name + "'; compiled variants: auto, " + known);
}
}  // namespace

#ifndef LOWBIT_HAVE_AVX512_EMULATED
// Referenced by select() to exclude it from "auto"; never registered when not compiled.
namespace avx512_emulated { const KernelTable kTable = {"avx512_emulated", nullptr, nullptr, nullptr, nullptr}; }
#endif

const KernelTable& active() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t) return *t;
  std::lock_guard<std::mutex> lock(g_isa_mutex);
  if (!g_active.load()) {
    const char* env = std::getenv("LOWBIT_ISA");
    g_active.store(select(env ? env : ""), std::memory_order_release);
  }
  return *g_active.load();
}

const KernelTable& reference() { return ref::kTable; }

void set_isa(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_isa_mutex);
  g_active.store(select(name), std::memory_order_release);
}

std::string active_isa() { return active().name; }

// ---------------------------------------------------------------------------------------------
// Thread pool

namespace {
int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Pieces of a parallel_for are claimed one at a time by whichever threads run: the caller and
// the workers. A worker that is slow to start (asleep, or sharing its core with torch's spinning
// OpenMP threads, which can hold it off for a scheduler slice) then costs nothing: the caller
// claims the pieces it has not started. (With one fixed chunk per thread the caller waited for
// it: Gemma3-270M's lm_head, 168 MB of int8, took 9.8 ms a token with 2 threads against 6.6 ms
// when torch ran 1 thread.)
class ThreadPool {
 public:
  explicit ThreadPool(int n) : n_(n) {
    try {
      for (int i = 1; i < n_; ++i) workers_.emplace_back([this] { loop(); });
    } catch (const std::exception& e) {
      // the workers already started wait on cv_: stop them, or destroying it would hang
      stop();
      throw std::runtime_error("lowbit could start only " + std::to_string(workers_.size() + 1) +
                               " of " + std::to_string(n_) + " threads (" + e.what() +
                               "); use fewer (lowbit.set_num_threads)");
    }
  }
  ~ThreadPool() { stop(); }
  int size() const { return n_; }

  // Runs fn over `pieces` contiguous pieces of [0, n) (1 < pieces <= kMaxPieces).
  void run(int64_t n, int pieces, const std::function<void(int64_t, int64_t)>& fn) {
    const uint32_t id = ++job_id_;
    {
      std::lock_guard<std::mutex> l(m_);
      fn_ = &fn; n_items_ = n; pieces_ = pieces; error_ = nullptr;
      done_.store(0, std::memory_order_relaxed);
      ticket_.store(uint64_t(id) << 32 | uint64_t(pieces) << 16, std::memory_order_release);
    }
    cv_.notify_all();
    work(id);
    spin_until([&] { return done_.load(std::memory_order_acquire) == pieces; });
    std::unique_lock<std::mutex> l(m_);
    done_cv_.wait(l, [&] { return done_.load(std::memory_order_acquire) == pieces; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  static constexpr int kMaxPieces = 0xFFFF;

 private:
  // The ticket: job id (32 bits) | pieces (16) | next unclaimed piece (16). A claim is a CAS on
  // the whole word, so a thread still holding an old job's id never takes a piece of a newer
  // job, and a successful claim means the job is live (its caller waits for every piece), so
  // fn_ and n_items_ read after it are that job's.
  bool claim(uint32_t id, int* piece) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const uint32_t tid = uint32_t(t >> 32), pieces = uint32_t(t >> 16) & 0xFFFF, next = uint32_t(t) & 0xFFFF;
      if (tid != id || next >= pieces) return false;
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        *piece = int(next);
        return true;
      }
    }
  }
  // Claims and runs pieces of job id until none is left.
  void work(uint32_t id) {
    int c;
    while (claim(id, &c)) {
      const int pieces = pieces_;  // read while the job is live: once this piece counts as done it may not be
      const int64_t b = n_items_ * c / pieces, e = n_items_ * (c + 1) / pieces;
      try {
        if (b < e) (*fn_)(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> l(m_);
        if (!error_) error_ = std::current_exception();
      }
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == pieces) {
        std::lock_guard<std::mutex> l(m_);  // the caller may be between its check and its wait
        done_cv_.notify_one();
      }
    }
  }
  // Spin for up to kSpin before sleeping: waking a sleeping worker costs 20-60 µs in a VM, as
  // much as a small layer's whole call, and a model's layers call lowbit every few hundred µs
  // with other work between (GNU OpenMP's threads spin for milliseconds too). M = 1, K = N =
  // 2048, 2 threads, calls 300 µs apart, lowbit's pool, min / median µs, 50 µs -> 1 ms of spin:
  // int4 g128 93 / 130 -> 68 / 81, int8 147 / 231 -> 123 / 143 (one thread: 101 / 127, 175 /
  // 256). Timed, not counted: a pause takes 25 ns on this Zen 4, ~40 on Intel since Skylake.
  template <typename Pred>
  static void spin_until(Pred done) {
    const auto end = std::chrono::steady_clock::now() + kSpin;
    for (;;) {
      for (int i = 0; i < 16; ++i) {  // a clock read every 16 pauses
        if (done()) return;
        _mm_pause();
      }
      if (std::chrono::steady_clock::now() >= end) return;
    }
  }
  static constexpr std::chrono::microseconds kSpin{1000};
  uint32_t current_job() const { return uint32_t(ticket_.load(std::memory_order_acquire) >> 32); }
  void loop() {
    uint32_t seen = 0;
    for (;;) {
      spin_until([&] { return current_job() != seen; });
      {
        std::unique_lock<std::mutex> l(m_);
        cv_.wait(l, [&] { return stop_ || current_job() != seen; });
        if (stop_) return;
      }
      seen = current_job();
      work(seen);
    }
  }

  void stop() {
    { std::lock_guard<std::mutex> l(m_); stop_ = true; }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  bool stop_ = false;
  uint32_t job_id_ = 0;  // the callers' side (serialized by g_pool_mutex)
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int> done_{0};
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_items_ = 0;
  int pieces_ = 1;
  std::exception_ptr error_;
};

std::mutex g_pool_mutex;      // serializes users of the pool; a busy pool means run inline
ThreadPool* g_pool = nullptr;
int g_num_threads = 0;        // 0: not set yet
thread_local bool t_in_parallel = false;
bool g_forked = false;

// A forked child has the pool object but none of its threads: drop it (leaked on purpose).
void forget_pool_after_fork() {
  g_pool = nullptr;
  new (&g_pool_mutex) std::mutex();
  g_forked = true;
}

// GNU OpenMP, when something in this process (torch) has loaded it. After each parallel region
// its threads spin for milliseconds waiting for the next one; lowbit's own workers would share
// the cores with them meanwhile (a Gram update right after a torch op ran 1.5x slower). Running
// lowbit's pieces on that same team instead reuses the spinning threads. Looked up with
// RTLD_NOLOAD (loaded or not, never loading it) until found; never in a forked child, where
// libgomp's threads are gone. A lookup that fails reads ld.so.cache (an mmap and a munmap, whose
// TLB shootdown interrupts a running worker: ~30 µs a call on the EPYC VM, 15x a small decode
// call's own cost), so it is retried only after a library has been loaded since the last one.
struct Gomp {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*max_threads)() = nullptr;
  int (*in_parallel)() = nullptr;
};
// How many shared objects this process has loaded so far (glibc's running count; never
// decreases), read from the first entry dl_iterate_phdr reports.
unsigned long long libraries_loaded() {
  unsigned long long adds = 0;
  dl_iterate_phdr([](dl_phdr_info* info, size_t size, void* out) {
    if (size >= offsetof(dl_phdr_info, dlpi_adds) + sizeof(info->dlpi_adds))
      *static_cast<unsigned long long*>(out) = info->dlpi_adds;
    return 1;  // the first entry is enough
  }, &adds);
  return adds;
}
const Gomp* loaded_gomp() {
  static std::atomic<const Gomp*> found{nullptr};
  if (g_forked) return nullptr;
  if (const Gomp* g = found.load(std::memory_order_acquire)) return g;
  static std::atomic<unsigned long long> looked_at{~0ull};  // libraries loaded at the last lookup
  const unsigned long long loads = libraries_loaded();
  if (looked_at.exchange(loads, std::memory_order_relaxed) == loads) return nullptr;
  void* lib = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (!lib) return nullptr;
  static Gomp gomp;
  gomp.parallel = reinterpret_cast<decltype(gomp.parallel)>(dlsym(lib, "GOMP_parallel"));
  gomp.max_threads = reinterpret_cast<decltype(gomp.max_threads)>(dlsym(lib, "omp_get_max_threads"));
  gomp.in_parallel = reinterpret_cast<decltype(gomp.in_parallel)>(dlsym(lib, "omp_in_parallel"));
  if (!gomp.parallel || !gomp.max_threads || !gomp.in_parallel) return nullptr;  // handle kept: tiny
  found.store(&gomp, std::memory_order_release);
  return &gomp;
}

// parallel_for's pieces on an OpenMP team: each member claims pieces until none is left.
struct GompJob {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n;
  int pieces;
  std::atomic<int> next{0};
  std::mutex m;
  std::exception_ptr error;
};
void gomp_member(void* p) {
  GompJob& j = *static_cast<GompJob*>(p);
  for (int c; (c = j.next.fetch_add(1, std::memory_order_relaxed)) < j.pieces;) {
    const int64_t b = j.n * c / j.pieces, e = j.n * (c + 1) / j.pieces;
    try {
      if (b < e) (*j.fn)(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> l(j.m);
      if (!j.error) j.error = std::current_exception();
    }
  }
}
}  // namespace

constexpr int kMaxThreads = 1024;
constexpr int kPiecesPerThread = 4;

void set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads)
    throw std::invalid_argument("num_threads must be in [1, " + std::to_string(kMaxThreads) + "], got " +
                                std::to_string(n));
  std::lock_guard<std::mutex> l(g_pool_mutex);
  if (g_pool && g_pool->size() != n) { delete g_pool; g_pool = nullptr; }
  g_num_threads = n;
}

int get_num_threads() {
  std::lock_guard<std::mutex> l(g_pool_mutex);
  if (g_num_threads == 0) {
    const char* env = std::getenv("LOWBIT_NUM_THREADS");
    if (env && *env) {
      char* end = nullptr;
      long n = std::strtol(env, &end, 10);
      if (*end || n < 1 || n > kMaxThreads)
        throw std::invalid_argument("LOWBIT_NUM_THREADS must be an integer in [1, " +
                                    std::to_string(kMaxThreads) + "], got '" + env + "'");
      g_num_threads = int(n);
    } else {
      g_num_threads = default_threads();
    }
  }
  return g_num_threads;
}

// OpenMP's team runs the pieces when it is loaded, outside its own parallel regions, for up to
// as many threads as it is set to use or this process has CPUs: libgomp aborts the process when
// a thread will not start, where lowbit's pool reports it (an absurd count, say) as an error
static const Gomp* usable_gomp(int threads) {
  const Gomp* gomp = loaded_gomp();
  // the CPU count (a sched_getaffinity call) only when OpenMP's own count is exceeded
  return gomp && (threads <= gomp->max_threads() || threads <= default_threads()) && !gomp->in_parallel()
             ? gomp : nullptr;
}

std::string thread_runtime() { return usable_gomp(get_num_threads()) ? "openmp" : "lowbit"; }

void parallel_for(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  static std::once_flag fork_hook;
  std::call_once(fork_hook, [] { pthread_atfork(nullptr, nullptr, forget_pool_after_fork); });
  int threads = get_num_threads();
  // pieces of at least min_chunk items, up to kPiecesPerThread a thread (claimed dynamically)
  const int64_t pieces = std::min<int64_t>({int64_t(threads) * kPiecesPerThread, ThreadPool::kMaxPieces,
                                            (n + std::max<int64_t>(min_chunk, 1) - 1) / std::max<int64_t>(min_chunk, 1)});
  std::unique_lock<std::mutex> l(g_pool_mutex, std::try_to_lock);
  if (threads <= 1 || pieces <= 1 || t_in_parallel || !l.owns_lock()) {
    fn(0, n);  // one piece, or a nested or concurrent call: run on the calling thread
    return;
  }
  if (const Gomp* gomp = usable_gomp(threads)) {
    GompJob job{&fn, n, int(pieces)};
    t_in_parallel = true;
    gomp->parallel(gomp_member, &job, unsigned(std::min<int64_t>(threads, pieces)), 0);
    t_in_parallel = false;
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  if (!g_pool) g_pool = new ThreadPool(threads);
  t_in_parallel = true;
  try {
    g_pool->run(n, int(pieces), fn);
  } catch (...) {
    t_in_parallel = false;
    throw;
  }
  t_in_parallel = false;
}

// ---------------------------------------------------------------------------------------------
// Validated entry points

static void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

static void validate_format(const QuantFormat& f, int64_t K) {
  require(f.bits == 2 || f.bits == 3 || f.bits == 4 || f.bits == 8,
          "bits must be 2, 3, 4 or 8, got " + std::to_string(f.bits));
  require(f.scheme != Scheme::nf4 || f.bits == 4, "nf4 needs bits=4");
  require(f.group_size > 0, "group_size must be positive, got " + std::to_string(f.group_size));
  require(f.group_size == K || f.group_size % 16 == 0,
          "group_size must be a multiple of 16 (or the whole row), got " + std::to_string(f.group_size));
  require(f.clip_ratio > 0.f && f.clip_ratio <= 1.f, "clip_ratio must be in (0, 1]");
}

void quantize(const QuantizeArgs& a) {
  require(a.rows > 0 && a.K > 0, "w is empty (shape [" + std::to_string(a.rows) + ", " +
                                     std::to_string(a.K) + "])");
  require(a.ld_w >= a.K, "w row stride is smaller than its row length");
  validate_format(a.fmt, a.K);
  require(a.w && a.scales && a.codes, "null pointer passed to quantize");
  const bool asym = a.fmt.scheme == Scheme::asymmetric;
  require(!asym || a.zeros, "asymmetric quantization needs a zeros buffer");
  const int64_t G = num_groups(a.K, a.fmt.group_size);
  if (a.params_given) {
    const int qmax = (1 << a.fmt.bits) - 1;
    for (int64_t i = 0; i < a.rows * G; ++i) {  // messages are built only on failure
      if (!(std::isfinite(a.scales[i]) && a.scales[i] >= 0.f))
        require(false, "scales must be finite and >= 0 (index " + std::to_string(i) + ")");
      if (asym && a.zeros[i] > qmax)
        require(false, "zeros must be integers in [0, " + std::to_string(qmax) + "] for " +
                           std::to_string(a.fmt.bits) + "-bit codes");
    }
  }
  QuantizeFn fn = active().quantize ? active().quantize : reference().quantize;
  std::atomic<int64_t> bad_row{-1};
  parallel_for(a.rows, std::max<int64_t>(1, 32768 / a.K), [&](int64_t r0, int64_t r1) {
    int64_t bad = fn(a, r0, r1);
    if (bad >= 0) {
      int64_t cur = bad_row.load();
      while ((cur < 0 || bad < cur) && !bad_row.compare_exchange_weak(cur, bad)) {}
    }
  });
  require(bad_row.load() < 0,
          "w contains NaN or Inf (first in row " + std::to_string(bad_row.load()) + ")");
}

void dequantize(const DequantizeArgs& a) {
  require(a.rows > 0 && a.K > 0, "codes are empty");
  validate_format(a.fmt, a.K);
  require(a.codes && a.scales && a.out, "null pointer passed to dequantize");
  require(a.fmt.scheme != Scheme::asymmetric || a.zeros, "asymmetric format needs zeros");
  DequantizeFn fn = active().dequantize ? active().dequantize : reference().dequantize;
  parallel_for(a.rows, std::max<int64_t>(1, 32768 / a.K),
               [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
}

void pack_int4(const uint8_t* codes, int64_t rows, int64_t K, bool is_signed, uint8_t* packed) {
  require(rows > 0 && K > 0, "codes are empty");
  const int64_t pb = packed_row_bytes(K, 4);
  std::atomic<bool> out_of_range{false};
  parallel_for(rows, std::max<int64_t>(1, 65536 / K), [&](int64_t r0, int64_t r1) {
    bool bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* c = codes + r * K;
      uint8_t* p = packed + r * pb;
      for (int64_t k = 0; k < K; ++k) {
        // A 4-bit code is in [0, 15], or [-8, 7] as int8: then its top five bits are all equal.
        uint8_t v = c[k];
        bad |= is_signed ? uint8_t(v + 8) > 15 : v > 15;
        if (k & 1) p[k >> 1] = uint8_t(p[k >> 1] | (v << 4));
        else p[k >> 1] = v & 0xF;
      }
    }
    if (bad) out_of_range = true;
  });
  require(!out_of_range, is_signed ? "codes must be in [-8, 7] to pack as signed int4"
                                   : "codes must be in [0, 15] to pack as int4");
}

void unpack_int4(const uint8_t* packed, int64_t rows, int64_t K, bool sign_extend, uint8_t* codes) {
  const int64_t pb = packed_row_bytes(K, 4);
  parallel_for(rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* p = packed + r * pb;
      uint8_t* c = codes + r * K;
      for (int64_t k = 0; k < K; ++k) {
        uint8_t v = (p[k >> 1] >> ((k & 1) * 4)) & 0xF;
        c[k] = sign_extend && (v & 8) ? uint8_t(v | 0xF0) : v;  // two's complement nibble
      }
    }
  });
}

}  // namespace lowbit
