// A few int8 activation rows times an int8 weight stored [out, in], summed exactly in int32:
// y[P, Q] = xq[P, C] . w[Q, C]^T, the product runtime.lower_jax.int8_dot asks for.
//
// Decode is memory-bound: at batch 1 the step reads every weight once. XLA hands this dot to
// its library, which on a CPU without AVX-VNNI (AMD Zen 3, say) runs it at a quarter to a third
// of the rate the machine reads memory; this kernel streams each weight once through AVX2 byte
// multiply-adds (maddubs), four weight rows per pass over one activation row (tiles of 2
// weight rows x 4 activation rows for more), prefetching ahead, with the rows split between
// the calling thread and helpers of its own. Integer sums are exact, so its result equals
// XLA's bit for bit and the tokens do not change.
//
// Built by runtime/cpu_kernels/build.py at first use (g++ -O3 -mavx2), loaded with ctypes
// and registered as the XLA FFI target einshard_int_rows_dot.

#include <immintrin.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Measured on a 2-core Zen 3 (a 30-layer SmolLM2-shaped chain): a helper spinning 200 us
// between calls keeps up with a decode step; 64 KiB chunks split a 576 x 192 projection in two;
// prefetching two 4-row groups ahead read 12-13 GB/s per core against 9 without.
constexpr int kSpinMicros = 200;
constexpr int64_t kChunkBytes = int64_t{64} << 10;
constexpr int64_t kPrefetchGroups = 2;

// Integer rows: y[P, Q] (int32, exact) = xq[P, C] . w[Q, C]^T for int8 xq and w, the products
// of runtime.lower_jax.int8_dot (each activation row quantized to int8 by the caller), so the
// result equals XLA's int8 dot bit for bit. AVX2 has no signed x signed byte multiply: maddubs
// multiplies unsigned by signed bytes, so it gets |w| (exact for -128 too, read unsigned) and
// x with w's sign (x in [-127, 127], negated safely); two products of at most 128 x 127 sum
// within int16, and madd with ones widens them to int32.
inline __m256i dot32(__m256i x, __m256i w, __m256i ones) {
  __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(p, ones);
}
inline int32_t hsum_i32(__m256i v) {
  __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  a = _mm_hadd_epi32(a, a);
  a = _mm_hadd_epi32(a, a);
  return _mm_cvtsi128_si32(a);
}

// Rows [q0, q1) of y for P > 1 activation rows: tiles of 2 weight rows x 4 activation rows (8
// accumulators), so each weight vector is loaded and made unsigned once for 4 rows; a tile's
// weight rows stay in L1 across the row groups.
void int_rows_many(const int8_t* x, const int8_t* w, int32_t* y, int64_t P, int64_t C, int64_t Q,
                   int64_t q0, int64_t q1) {
  const int64_t C32 = C - C % 32;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = q0; q < q1; q += 2) {
    const bool two = q + 1 < q1;
    const int8_t* w0 = w + q * C;
    const int8_t* w1 = two ? w0 + C : w0;
    const char* pf = reinterpret_cast<const char*>(w0) + kPrefetchGroups * 2 * C;
    for (int64_t p0 = 0; p0 < P; p0 += 4) {
      const int64_t pp = P - p0 < 4 ? P - p0 : 4;
      const int8_t* xs[4];
      for (int i = 0; i < 4; ++i) xs[i] = x + (p0 + (i < pp ? i : 0)) * C;
      __m256i a[2][4];
      for (int j = 0; j < 2; ++j)
        for (int i = 0; i < 4; ++i) a[j][i] = _mm256_setzero_si256();
      for (int64_t c = 0; c < C32; c += 32) {
        if (p0 == 0) _mm_prefetch(pf + 2 * c, _MM_HINT_T0);
        const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + c));
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + c));
        const __m256i au = _mm256_abs_epi8(u), av = _mm256_abs_epi8(v);
        for (int i = 0; i < 4; ++i) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[i] + c));
          a[0][i] = _mm256_add_epi32(a[0][i], _mm256_madd_epi16(_mm256_maddubs_epi16(au, _mm256_sign_epi8(xv, u)), ones));
          a[1][i] = _mm256_add_epi32(a[1][i], _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(xv, v)), ones));
        }
      }
      for (int64_t i = 0; i < pp; ++i) {
        int32_t r0 = hsum_i32(a[0][i]), r1 = hsum_i32(a[1][i]);
        for (int64_t c = C32; c < C; ++c) {
          r0 += int32_t{w0[c]} * int32_t{xs[i][c]};
          r1 += int32_t{w1[c]} * int32_t{xs[i][c]};
        }
        y[(p0 + i) * Q + q] = r0;
        if (two) y[(p0 + i) * Q + q + 1] = r1;
      }
    }
  }
}

// Rows [q0, q1) of y for one activation row: four weight rows per pass over it.
void int_row(const int8_t* xp, const int8_t* w, int32_t* y, int64_t C, int64_t q0, int64_t q1) {
  const int64_t C32 = C - C % 32;
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t q = q0;
  for (; q + 4 <= q1; q += 4) {
    const int8_t* w0 = w + q * C;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    const char* pf = reinterpret_cast<const char*>(w0) + kPrefetchGroups * 4 * C;
    for (int64_t c = 0; c < C32; c += 32) {
      _mm_prefetch(pf + 4 * c, _MM_HINT_T0);  // the same bytes kPrefetchGroups groups ahead
      _mm_prefetch(pf + 4 * c + 64, _MM_HINT_T0);
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + c));
      a0 = _mm256_add_epi32(a0, dot32(xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + c)), ones));
      a1 = _mm256_add_epi32(a1, dot32(xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + C + c)), ones));
      a2 = _mm256_add_epi32(a2, dot32(xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 2 * C + c)), ones));
      a3 = _mm256_add_epi32(a3, dot32(xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 3 * C + c)), ones));
    }
    int32_t r[4] = {hsum_i32(a0), hsum_i32(a1), hsum_i32(a2), hsum_i32(a3)};
    for (int64_t c = C32; c < C; ++c)
      for (int j = 0; j < 4; ++j) r[j] += int32_t{w0[j * C + c]} * int32_t{xp[c]};
    for (int j = 0; j < 4; ++j) y[q + j] = r[j];
  }
  for (; q < q1; ++q) {
    const int8_t* w0 = w + q * C;
    __m256i a = _mm256_setzero_si256();
    for (int64_t c = 0; c < C32; c += 32)
      a = _mm256_add_epi32(a, dot32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + c)),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + c)), ones));
    int32_t r = hsum_i32(a);
    for (int64_t c = C32; c < C; ++c) r += int32_t{w0[c]} * int32_t{xp[c]};
    y[q] = r;
  }
}

// The kernels' own helper threads (one fewer than the CPUs this process may run on). XLA's
// intra-op pool wakes a sleeping thread in tens of microseconds, about as long as one of a
// decode step's small projections takes, so the caller did most chunks alone; these helpers
// spin for kSpinMicros after each call (a step calls the kernel every few tens of microseconds)
// and sleep after that. One call uses them at a time; a second concurrent caller (another
// device of a multi-device program) runs its chunks alone rather than wait.
//
// A call is published as one atomic word, (generation 24 bits, chunks 20, next chunk 20): a
// helper claims a chunk by a compare-and-swap of that word, so it can never claim a chunk of a
// call that has ended (all its chunks claimed) or take a chunk index to the wrong call.
class Helpers {
 public:
  using Fn = void (*)(const void*, int64_t);

  static Helpers& get() {
    static Helpers* h = new Helpers();  // never destroyed: helpers may outlive static destructors
    return *h;
  }

  // Runs fn(ctx, i) for every i in [0, n), on the caller and the helpers.
  void run(int64_t n, Fn fn, const void* ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || n <= 1 || n >= (int64_t{1} << 20) || threads_.empty()) {
      for (int64_t i = 0; i < n; ++i) fn(ctx, i);
      return;
    }
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xffffff;
    word_.store((gen_ << 40) | (static_cast<uint64_t>(n) << 20), std::memory_order_release);
    {
      std::lock_guard<std::mutex> g(sleep_);
      if (sleepers_ > 0) wake_.notify_all();
    }
    while (claim()) {
    }
    while (done_.load(std::memory_order_acquire) < n) _mm_pause();
  }

 private:
  Helpers() {
    cpu_set_t set;
    int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    for (int i = 1; i < cpus && i < 64; ++i) threads_.emplace_back([this] { loop(); });
    for (auto& t : threads_) t.detach();
  }

  static bool open(uint64_t w) { return (w & 0xfffff) < ((w >> 20) & 0xfffff); }

  // Claims and runs one chunk of the current call; false when none is left.
  bool claim() {
    for (;;) {
      uint64_t w = word_.load(std::memory_order_acquire);
      if (!open(w)) return false;
      Fn fn = fn_.load(std::memory_order_relaxed);
      const void* ctx = ctx_.load(std::memory_order_relaxed);
      if (word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) {
        fn(ctx, static_cast<int64_t>(w & 0xfffff));
        done_.fetch_add(1, std::memory_order_release);
        return true;
      }
    }
  }

  void loop() {
    for (;;) {
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      while (!open(word_.load(std::memory_order_acquire))) {
        if (std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> g(sleep_);
          ++sleepers_;
          wake_.wait(g, [this] { return open(word_.load(std::memory_order_acquire)); });
          --sleepers_;
          break;
        }
        _mm_pause();
        _mm_pause();
      }
      while (claim()) {
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_, sleep_;
  std::condition_variable wake_;
  int sleepers_ = 0;
  uint64_t gen_ = 0;
  std::atomic<uint64_t> word_{0};
  std::atomic<Fn> fn_{nullptr};
  std::atomic<const void*> ctx_{nullptr};
  std::atomic<int64_t> done_{0};
};

// Rows of y in chunks of ~kChunkBytes of weights (a multiple of 4 rows), computed by
// ``rows_fn(q0, q1)`` on the calling thread and the helpers.
template <typename F>
void run(int64_t Q, int64_t row_bytes, const F& rows_fn) {
  int64_t rows = kChunkBytes / (row_bytes + 1);
  rows = rows < 4 ? 4 : rows - rows % 4;
  struct Ctx {
    const F* f;
    int64_t rows, Q;
  } ctx{&rows_fn, rows, Q};
  Helpers::get().run((Q + rows - 1) / rows, [](const void* p, int64_t i) {
    auto* c = static_cast<const Ctx*>(p);
    int64_t q0 = i * c->rows;
    (*c->f)(q0, q0 + c->rows < c->Q ? q0 + c->rows : c->Q);
  }, &ctx);
}

ffi::Error int_rows_dot(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                        ffi::ResultBuffer<ffi::S32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("int_rows_dot: expects x[P, C] and w[Q, C]");
  const int8_t* xp = reinterpret_cast<const int8_t*>(x.typed_data());
  const int8_t* wp = reinterpret_cast<const int8_t*>(w.typed_data());
  int32_t* yp = y->typed_data();
  const int64_t P = xd[0], C = xd[1], Q = wd[0];
  run(Q, C, [=](int64_t q0, int64_t q1) {
    if (P == 1)
      int_row(xp, wp, yp, C, q0, q1);
    else
      int_rows_many(xp, wp, yp, P, C, Q, q0, q1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EinshardIntRowsDot, int_rows_dot,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// 1 when this CPU runs the AVX2 code above (checked before the target is registered).
extern "C" int einshard_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}
