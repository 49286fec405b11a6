// CPU kernels of the Mamba layer: the selective scan (S6 recurrence) and the causal depthwise convolution,
// forward and backward.
//
// Selective scan: the semantics of dmmh.ops.selective_scan_ref (mamba-ssm's selective_scan_fn),
//   dt  = softplus(delta + delta_bias)                      (bias, softplus optional)
//   x_t = exp(dt_t A) x_{t-1} + dt_t u_t B_t,   y_t = <x_t, C_t> + D u_t,   out = y * silu(z)
// The forward also takes delta in low rank, (b, r, l) with delta_proj (d, r): delta = delta_proj @ delta,
// computed step by step (Mamba's dt_proj, fused: the (b, d, l) delta is never written to memory).
// Causal convolution: the semantics of dmmh.ops.causal_conv1d_ref (the causal-conv1d package's function),
//   out_t = act(bias + sum_k w_k x_{t-K+1+k}),  x_{<0} = 0,  act = silu or identity
//
// Layout. Sequences (u, delta, z, x, out and their gradients) are (b, d, l) tensors whose channels are
// contiguous (stride(1) == 1: memory (b, l, d), what a Linear layer produces), so a block of kLanes
// channels is one vector and every loop over lanes compiles to SIMD code. B and C are either variable,
// (b, G, n, l) with any strides (both share G, each group covering d / G channels), or constant, (d, n).
//
// Threads. Each call opens one parallel region (at::parallel_for) over large independent tasks, handed
// out dynamically (see parallel_tasks): a task owns whole rows (batch item x channel block, or x channel
// group in the scan's backward), keeps its state in a small per-thread buffer and writes disjoint memory,
// so threads never share cache lines in their inner loops. Calls too small to repay the region run on
// the calling thread.
// Parameter gradients are summed per batch item and then over items, so results do not depend on the
// number of threads.
//
// Memory. The scan's forward keeps one state per channel (O(b d n)); for the backward it can also save
// the state every kChunk steps, and the backward recomputes each chunk's states from it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 64;            // steps between saved states (and per backward recomputation)
constexpr int64_t kGroup = 8;             // steps whose elementwise work the forward does together
constexpr int64_t kMinTaskWork = 1 << 18; // lane-steps per thread below which a call stays on one thread

template <typename T>
constexpr int kLanes = 64 / sizeof(T);  // channels per block: one 64-byte vector

// Loops over the lanes of a block are SIMD loops (OpenMP simd: their iterations are independent), and
// the functions they call are inlined into them.
#define FOR_LANES(i) _Pragma("omp simd") for (int i = 0; i < W; ++i)
#if defined(__GNUC__)
#define LANE_FN inline __attribute__((always_inline))
#else
#define LANE_FN inline
#endif

// ---- elementwise functions written so that loops over lanes vectorise (no libm calls for float)

LANE_FN float exp2_lane(float t) {
  // 2^t = 2^k 2^f with k = round(t), |f| <= 1/2; 2^f by a degree-6 polynomial fitted for relative error
  // (1.9e-9, below float32 rounding), computed as (2 2^f) 2^(k-1) so that k - 1 >= -126 stays a normal float.
  // Below 2^-124.8 (e^-86.5, 2.7e-38) results flush to 0, past 2^128 they are inf, NaN stays NaN (through f).
  const float tm = t + 12582912.0f;  // 1.5 * 2^23: rounds t to the integer k, kept in tm's low mantissa bits
  const float f = t - (tm - 12582912.0f);
  float p = 3.0692500877194107e-04f;  // the coefficients of 2 * 2^f
  p = p * f + 2.6799871120601892e-03f;
  p = p * f + 1.9236974418163300e-02f;
  p = p * f + 1.1100657284259796e-01f;
  p = p * f + 4.8045292496681213e-01f;
  p = p * f + 1.3862943649291992e+00f;
  p = p * f + 2.0f;
  int32_t bits;
  std::memcpy(&bits, &tm, sizeof(bits));
  bits = (bits - 0x4B400000 + 126) << 23;  // 2^(k-1)
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = t < -124.79f ? 0.0f : p * scale;
  return t > 128.0f ? std::numeric_limits<float>::infinity() : e;
}

LANE_FN double exp2_lane(double t) { return std::exp2(t); }

template <typename T>
LANE_FN T exp_lane(T x) {
  return exp2_lane(x * T(1.44269504088896340736));
}

LANE_FN float log1p_unit(float e) {
  // log(1 + e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) <= 1/3, odd series to s^15
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

LANE_FN double log1p_unit(double e) { return std::log1p(e); }

template <typename T>
LANE_FN T softplus(T x) {  // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|)
  const T ax = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + log1p_unit(exp_lane(-ax));
}

template <typename T>
LANE_FN T sigmoid(T x) {
  return T(1) / (T(1) + exp_lane(-x));
}

// Buffers of lanes, aligned to whole 64-byte vectors (a vector split over two cache lines loads and stores
// slower, and stops store-to-load forwarding of the state between steps).
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const AlignedAlloc<U>&) const { return true; }
};
template <typename T>
using LaneVec = std::vector<T, AlignedAlloc<T>>;

// Subnormal numbers flushed to zero on this thread while it exists (x86's FTZ and DAZ, restored after):
// exponentials of very negative dt A are subnormal, and arithmetic on subnormals is many times slower on
// some CPUs (microcode assists). The values flushed are below 1.2e-38.
struct FlushSubnormals {
#if defined(__SSE__)
  unsigned int saved = _mm_getcsr();
  FlushSubnormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushSubnormals() { _mm_setcsr(saved); }
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
#endif
};

// ---- views

template <typename T>
struct Seq {  // (b, d, l) with contiguous channels; p == nullptr when absent
  T* p = nullptr;
  int64_t sb = 0, sl = 0;
  Seq() = default;
  explicit Seq(const at::Tensor& t) : p(t.defined() ? t.data_ptr<std::remove_const_t<T>>() : nullptr) {
    if (p) sb = t.stride(0), sl = t.stride(2);
  }
  T* at(int64_t b, int64_t c, int64_t t) const { return p + b * sb + t * sl + c; }
};

template <typename T>
struct Mat {  // B or C: variable (b, G, n, l), or constant (d, n)
  const T* p = nullptr;
  bool variable = false;
  int64_t sb = 0, sg = 0, sn = 0, sl = 0, sd = 0;
  explicit Mat(const at::Tensor& t) : p(t.data_ptr<T>()), variable(t.dim() == 4) {
    if (variable) sb = t.stride(0), sg = t.stride(1), sn = t.stride(2), sl = t.stride(3);
    else sd = t.stride(0), sn = t.stride(1);
  }
};

template <typename T>
struct LowRank {  // delta given as (b, r, l) with any strides, and the (d, r) projection to the channels
  const T* p = nullptr;  // nullptr: delta is (b, d, l)
  int64_t sb = 0, sr = 0, sl = 0, r = 0;
  const T* w = nullptr;
  int64_t swd = 0, swr = 0;
};

template <typename T>
struct Problem {
  int64_t b, d, l, n, groups;  // groups: of the variable B/C (1 if both are constant)
  Seq<const T> u, delta, z;
  const T* A;
  int64_t sAd, sAn;
  Mat<T> B, C;
  const T *D, *bias;  // contiguous (d,) or nullptr
  bool softplus;
  LowRank<T> low;
  int64_t group_size() const { return d / groups; }
};

template <typename T>
Problem<T> make_problem(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& bias, bool softplus,
                        const std::optional<at::Tensor>& delta_proj = std::nullopt) {
  const auto st = u.scalar_type();
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == st && t.device().is_cpu(), "dmmh selective scan: ", name, " must be a CPU ",
                st, " tensor, got ", t.scalar_type(), " on ", t.device());
  };
  TORCH_CHECK(u.dim() == 3, "dmmh selective scan: u must be (b, d, l)");
  const int64_t b = u.size(0), d = u.size(1), l = u.size(2), n = A.size(1);
  auto seq = [&](const at::Tensor& t, const char* name) {
    same(t, name);
    TORCH_CHECK(t.sizes() == u.sizes() && (t.stride(1) == 1 || d <= 1), "dmmh selective scan: ", name,
                " must have u's shape with contiguous channels, got sizes ", t.sizes(), " strides ", t.strides());
  };
  seq(u, "u");
  LowRank<T> low;
  if (delta_proj) {  // delta is (b, r, l): projected to the channels step by step
    same(delta, "delta");
    same(*delta_proj, "delta_proj");
    TORCH_CHECK(delta_proj->dim() == 2 && delta_proj->size(0) == d && delta.dim() == 3 && delta.size(0) == b &&
                    delta.size(1) == delta_proj->size(1) && delta.size(2) == l,
                "dmmh selective scan: with delta_proj (d, r), delta must be (b, r, l)");
    low = {delta.data_ptr<T>(), delta.stride(0), delta.stride(1), delta.stride(2), delta.size(1),
           delta_proj->data_ptr<T>(), delta_proj->stride(0), delta_proj->stride(1)};
  } else {
    seq(delta, "delta");
  }
  same(A, "A");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == d, "dmmh selective scan: A must be (d, n)");
  int64_t groups = 1;
  for (const auto& [M, name] : {std::pair{&B, "B"}, std::pair{&C, "C"}}) {
    same(*M, name);
    if (M->dim() == 4) {
      TORCH_CHECK(M->size(0) == b && M->size(1) >= 1 && d % M->size(1) == 0 && M->size(2) == n && M->size(3) == l,
                  "dmmh selective scan: variable ", name, " must be (b, G, n, l)");
      groups = M->size(1);
    } else {
      TORCH_CHECK(M->dim() == 2 && M->size(0) == d && M->size(1) == n, "dmmh selective scan: ", name, " must be (d, n)");
    }
  }
  TORCH_CHECK(B.dim() != 4 || C.dim() != 4 || B.size(1) == C.size(1), "dmmh selective scan: B and C groups differ");
  Problem<T> P{b, d, l, n, groups, Seq<const T>(u), delta_proj ? Seq<const T>() : Seq<const T>(delta), Seq<const T>(),
               A.data_ptr<T>(), A.stride(0), A.stride(1), Mat<T>(B), Mat<T>(C), nullptr, nullptr, softplus, low};
  if (z) {
    seq(*z, "z");
    P.z = Seq<const T>(*z);
  }
  for (const auto& [t, ptr, name] : {std::tuple{&D, &P.D, "D"}, std::tuple{&bias, &P.bias, "delta_bias"}}) {
    if (*t) {
      same(**t, name);
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == d && (*t)->is_contiguous(), "dmmh selective scan: ", name,
                  " must be contiguous (d,)");
      *ptr = (*t)->template data_ptr<T>();
    }
  }
  return P;
}

template <typename T>
at::Tensor empty_seq(int64_t b, int64_t d, int64_t l, const at::Tensor& like) {  // (b, d, l), channels contiguous
  return at::empty({b, l, d}, like.options()).transpose(1, 2);
}

// ---- one block of W channels: its constants, loads and stores

template <typename T>
struct Block {
  static constexpr int W = kLanes<T>;
  int64_t c0;  // first channel
  int w;       // channels used (<= W); the other lanes compute on zeros and are never stored
};

template <typename T>
inline void load(T* __restrict__ dst, const T* src, int w) {
  constexpr int W = kLanes<T>;
  if (w == W) {
    FOR_LANES(i) dst[i] = src[i];
  } else {
    FOR_LANES(i) dst[i] = i < w ? src[i] : T(0);
  }
}

template <typename T>
inline void store(T* dst, const T* __restrict__ src, int w) {
  constexpr int W = kLanes<T>;
  if (w == W) {
    FOR_LANES(i) dst[i] = src[i];
  } else {
    for (int i = 0; i < w; ++i) dst[i] = src[i];
  }
}

template <typename T>
struct Lanes {  // a block's per-channel constants, lane-major: A[k * W + i] is A[c0 + i, k]; A2 = A log2(e)
  static constexpr int W = kLanes<T>;
  LaneVec<T> A, A2, Bc, Cc, Wlow;  // Wlow[j * W + i]: delta_proj[c0 + i, j]
  T D[W], bias[W];
  T dt_finite;  // |dt| below this keeps dt A2 finite (1e37 / max |A2|; NaN if A2 holds NaN)
  explicit Lanes(int64_t n) : A(n * W), A2(n * W), Bc(n * W), Cc(n * W) {}
  void fill(const Problem<T>& P, const Block<T>& blk) {
    for (int64_t k = 0; k < P.n; ++k)
      FOR_LANES(i) {
        const bool on = i < blk.w;
        const int64_t c = blk.c0 + i;
        A[k * W + i] = on ? P.A[c * P.sAd + k * P.sAn] : T(0);
        A2[k * W + i] = A[k * W + i] * T(1.44269504088896340736);
        Bc[k * W + i] = on && !P.B.variable ? P.B.p[c * P.B.sd + k * P.B.sn] : T(0);
        Cc[k * W + i] = on && !P.C.variable ? P.C.p[c * P.C.sd + k * P.C.sn] : T(0);
      }
    T a2_max = T(0);  // NaN once A2 holds a NaN
    for (int64_t j = 0; j < P.n * W; ++j) {
      const T m = std::abs(A2[j]);
      if (m > a2_max || std::isnan(m)) a2_max = m;
    }
    dt_finite = T(1e37) / a2_max;
    Wlow.resize(P.low.r * W);
    for (int64_t j = 0; j < P.low.r; ++j)
      FOR_LANES(i) Wlow[j * W + i] = i < blk.w ? P.low.w[(blk.c0 + i) * P.low.swd + j * P.low.swr] : T(0);
    FOR_LANES(i) {
      D[i] = P.D && i < blk.w ? P.D[blk.c0 + i] : T(0);
      bias[i] = P.bias && i < blk.w ? P.bias[blk.c0 + i] : T(0);
    }
  }
};

// delta + bias of steps t0 .. t0 + len - 1 into dt[s * W + i]; a low-rank delta is projected with the
// loop over its rank outside the loop over steps, so that the steps' sums are independent chains
template <typename T>
inline void raw_dt(const Problem<T>& P, const Lanes<T>& L, const Block<T>& blk, int64_t b, int64_t t0, int64_t len,
                   T* __restrict__ dt) {
  constexpr int W = kLanes<T>;
  if (!P.low.p) {
    for (int64_t s = 0; s < len; ++s) {
      load(dt + s * W, P.delta.at(b, blk.c0, t0 + s), blk.w);
      FOR_LANES(i) dt[s * W + i] += L.bias[i];
    }
    return;
  }
  for (int64_t s = 0; s < len; ++s) FOR_LANES(i) dt[s * W + i] = L.bias[i];
  const T* v = P.low.p + b * P.low.sb + t0 * P.low.sl;
  for (int64_t j = 0; j < P.low.r; ++j) {
    const T* __restrict__ wj = &L.Wlow[j * W];
    for (int64_t s = 0; s < len; ++s) {
      const T vj = v[s * P.low.sl + j * P.low.sr];
      FOR_LANES(i) dt[s * W + i] += wj[i] * vj;
    }
  }
}

// dt = softplus(delta + bias) in place (and d dt / d pre into dsp when given)
template <typename T>
inline void activate_dt(const Problem<T>& P, T* __restrict__ dt, T* __restrict__ dsp) {
  constexpr int W = kLanes<T>;
  if (P.softplus) {
    if (dsp)
      FOR_LANES(i) dsp[i] = sigmoid(dt[i]);
    FOR_LANES(i) dt[i] = softplus(dt[i]);
  } else if (dsp) {
    FOR_LANES(i) dsp[i] = T(1);
  }
}

// dt of one step (and d dt / d pre into dsp when given)
template <typename T>
inline void step_dt(const Problem<T>& P, const Lanes<T>& L, const Block<T>& blk, int64_t b, int64_t t, T* __restrict__ dt,
                    T* __restrict__ dsp) {
  raw_dt(P, L, blk, b, t, 1, dt);
  activate_dt(P, dt, dsp);
}

#if defined(__AVX512F__)
// exp2_lane on 16 float lanes in AVX-512's own instructions, equal to it wherever the result is a normal
// float: k = round(t) by vrndscaleps, the same polynomial with halved coefficients (so exactly half of
// exp2_lane's), scaled by 2^k with vscalefps, which also handles underflow (to 0 under FlushSubnormals),
// overflow (inf) and NaN, without exp2_lane's compare-and-selects. Only t = +-inf needs care (f = inf - inf
// is NaN): with kClamp t is first clamped to [-150, 129], keeping NaN (max(a, NaN) is NaN in this order).
template <bool kClamp>
inline __m512 exp2_avx512(__m512 t) {
  if (kClamp) t = _mm512_min_ps(_mm512_set1_ps(129.0f), _mm512_max_ps(_mm512_set1_ps(-150.0f), t));
  const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, k);
  __m512 p = _mm512_set1_ps(3.0692500877194107e-04f * 0.5f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.6799871120601892e-03f * 0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.9236974418163300e-02f * 0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.1100657284259796e-01f * 0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.8045292496681213e-01f * 0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3862943649291992e+00f * 0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

// step_state's loop over the states in AVX-512 instructions (16 float lanes: one register)
template <bool kClamp, bool VB, bool VC>
inline void step_state_avx512(const Problem<float>& P, const Lanes<float>& L, const float* Bv, const float* Cv, int64_t t,
                              __m512 vdt, __m512 vdtu, float* __restrict__ x, float* __restrict__ y, float* __restrict__ a) {
  constexpr int W = 16;
  __m512 vy = _mm512_setzero_ps();
  for (int64_t k = 0; k < P.n; ++k) {
    const __m512 bk = VB ? _mm512_set1_ps(Bv[k * P.B.sn + t * P.B.sl]) : _mm512_load_ps(&L.Bc[k * W]);
    const __m512 ck = VC ? _mm512_set1_ps(Cv[k * P.C.sn + t * P.C.sl]) : _mm512_load_ps(&L.Cc[k * W]);
    const __m512 e = exp2_avx512<kClamp>(_mm512_mul_ps(vdt, _mm512_load_ps(&L.A2[k * W])));
    if (a) _mm512_store_ps(a + k * W, e);
    const __m512 xk = _mm512_fmadd_ps(e, _mm512_load_ps(x + k * W), _mm512_mul_ps(vdtu, bk));
    _mm512_store_ps(x + k * W, xk);
    vy = _mm512_fmadd_ps(xk, ck, vy);
  }
  _mm512_storeu_ps(y, vy);
}
#endif

// One step of the recurrence for a block: x <- exp(dt A) x + dt u B;  returns <x, C> in y; the decays in `a` if given.
template <typename T, bool VB, bool VC>
inline void step_state(const Problem<T>& P, const Lanes<T>& L, const T* Bv, const T* Cv, int64_t t, const T* __restrict__ dt,
                       const T* __restrict__ dtu, T* __restrict__ x, T* __restrict__ y, T* __restrict__ a) {
  constexpr int W = kLanes<T>;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    // dt A log2(e) is finite (the exponentials need no clamp) unless |dt| >= L.dt_finite or is NaN
    const __m512 vdt = _mm512_loadu_ps(dt), vdtu = _mm512_loadu_ps(dtu);
    if (_mm512_cmp_ps_mask(_mm512_abs_ps(vdt), _mm512_set1_ps(L.dt_finite), _CMP_NLT_UQ))
      step_state_avx512<true, VB, VC>(P, L, Bv, Cv, t, vdt, vdtu, x, y, a);
    else
      step_state_avx512<false, VB, VC>(P, L, Bv, Cv, t, vdt, vdtu, x, y, a);
    return;
  }
#endif
  FOR_LANES(i) y[i] = T(0);
  for (int64_t k = 0; k < P.n; ++k) {
    const T bk = VB ? Bv[k * P.B.sn + t * P.B.sl] : T(0);
    const T ck = VC ? Cv[k * P.C.sn + t * P.C.sl] : T(0);
    const T* __restrict__ A2k = &L.A2[k * W];
    const T* __restrict__ Bk = &L.Bc[k * W];
    const T* __restrict__ Ck = &L.Cc[k * W];
    T* __restrict__ xk = x + k * W;
    if (a) {
      T* __restrict__ ak = a + k * W;
      FOR_LANES(i) {
        const T e = exp2_lane(dt[i] * A2k[i]);
        ak[i] = e;
        xk[i] = e * xk[i] + dtu[i] * (VB ? bk : Bk[i]);
        y[i] += xk[i] * (VC ? ck : Ck[i]);
      }
    } else {
      FOR_LANES(i) {
        xk[i] = exp2_lane(dt[i] * A2k[i]) * xk[i] + dtu[i] * (VB ? bk : Bk[i]);
        y[i] += xk[i] * (VC ? ck : Ck[i]);
      }
    }
  }
}

template <typename T>
const T* variable_ptr(const Mat<T>& M, const Problem<T>& P, int64_t b, int64_t c0) {
  return M.variable ? M.p + b * M.sb + (c0 / P.group_size()) * M.sg : nullptr;
}

// A block's state, lane-major (x[k * W + i]), to and from the rows of its channels ((c0 + i) * n + k)
template <typename T>
inline void state_to_rows(const T* x, T* rows, int w, int64_t n) {
  for (int i = 0; i < w; ++i)
    for (int64_t k = 0; k < n; ++k) rows[i * n + k] = x[k * kLanes<T> + i];
}

template <typename T>
inline void rows_to_state(const T* rows, T* x, int w, int64_t n) {
  for (int i = 0; i < w; ++i)
    for (int64_t k = 0; k < n; ++k) x[k * kLanes<T> + i] = rows[i * n + k];
}

// ---- forward

template <typename T, bool VB, bool VC>
void forward_block(const Problem<T>& P, const Block<T>& blk, int64_t b, Lanes<T>& L, T* x, Seq<T> out, T* last,
                   T* ckpt) {
  constexpr int W = kLanes<T>;
  const int64_t n = P.n, nck = (P.l + kChunk - 1) / kChunk;
  L.fill(P, blk);
  std::fill(x, x + n * W, T(0));
  const T* Bv = variable_ptr(P.B, P, b, blk.c0);
  const T* Cv = variable_ptr(P.C, P, b, blk.c0);
  // kGroup steps at a time: their dt (softplus) first, then the recurrence, then D and the gating, so
  // that the long dependency chains of softplus and silu of different steps overlap (measured: 30 % less
  // time than one step at a time)
  alignas(64) T dt[kGroup * W], uu[kGroup * W], dtu[kGroup * W], y[kGroup * W], zz[W];
  for (int64_t t0 = 0; t0 < P.l; t0 += kGroup) {
    const int64_t len = std::min(kGroup, P.l - t0);
    raw_dt(P, L, blk, b, t0, len, dt);
    for (int64_t s = 0; s < len; ++s) {
      activate_dt(P, dt + s * W, static_cast<T*>(nullptr));
      load(uu + s * W, P.u.at(b, blk.c0, t0 + s), blk.w);
      FOR_LANES(i) dtu[s * W + i] = dt[s * W + i] * uu[s * W + i];
    }
    for (int64_t s = 0; s < len; ++s) {
      const int64_t t = t0 + s;
      if (ckpt && t > 0 && t % kChunk == 0) {  // the state entering chunk t / kChunk
        state_to_rows(x, ckpt + ((b * (nck - 1) + t / kChunk - 1) * P.d + blk.c0) * n, blk.w, n);
      }
      step_state<T, VB, VC>(P, L, Bv, Cv, t, dt + s * W, dtu + s * W, x, y + s * W, static_cast<T*>(nullptr));
    }
    for (int64_t s = 0; s < len; ++s) {
      T* ys = y + s * W;
      FOR_LANES(i) ys[i] += L.D[i] * uu[s * W + i];
      if (P.z.p) {
        load(zz, P.z.at(b, blk.c0, t0 + s), blk.w);
        FOR_LANES(i) ys[i] *= zz[i] * sigmoid(zz[i]);
      }
      store(out.at(b, blk.c0, t0 + s), ys, blk.w);
    }
  }
  if (last) state_to_rows(x, last + (b * P.d + blk.c0) * n, blk.w, n);
}

// Blocks of one group: W channels each, the last one of a group possibly narrower.
template <typename T>
std::vector<Block<T>> group_blocks(int64_t c_begin, int64_t c_end) {
  std::vector<Block<T>> out;
  for (int64_t c = c_begin; c < c_end; c += kLanes<T>)
    out.push_back({c, static_cast<int>(std::min<int64_t>(kLanes<T>, c_end - c))});
  return out;
}

template <typename T>
int64_t grain(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_task));
}

// Tasks [0, tasks) in one parallel region (at::parallel_for over the threads), handed out in chunks of a few
// tasks from a shared counter: a thread that is slow to be scheduled holds up at most one chunk, the others
// take the rest. Calls with less work than two threads' minimum run inline. So does a thread with one
// intra-op thread, without calling at::parallel_for: its inlined first-use initialisation (one per library)
// would reset the thread's count to torch's default (dmmh's pass workers set theirs to 1, see
// dmmh/models/_passes.py).
template <typename F>
void parallel_tasks(int64_t tasks, int64_t min_tasks_per_thread, const F& f) {
  if (tasks <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks / std::max<int64_t>(1, min_tasks_per_thread));
  if (threads <= 1) {
    f(0, tasks);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, tasks / (8 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin; (begin = next.fetch_add(chunk)) < tasks;) f(begin, std::min(tasks, begin + chunk));
  });
}

template <typename T, bool VB, bool VC>
void forward(const Problem<T>& P, Seq<T> out, T* last, T* ckpt) {
  const int64_t hs = P.group_size();
  const auto blocks = group_blocks<T>(0, hs);  // the same in every group
  const int64_t nb = static_cast<int64_t>(blocks.size()), per_item = P.groups * nb;
  parallel_tasks(P.b * per_item, grain<T>(P.l * P.n * kLanes<T>), [&](int64_t begin, int64_t end) {
    FlushSubnormals ftz;
    Lanes<T> L(P.n);
    LaneVec<T> x(P.n * kLanes<T>);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_item, g = task % per_item / nb;
      Block<T> blk = blocks[task % nb];
      blk.c0 += g * hs;
      forward_block<T, VB, VC>(P, blk, b, L, x.data(), out, last, ckpt);
    }
  });
}

template <typename T, template <typename, bool, bool> class F, typename... Args>
void dispatch_bc(const Problem<T>& P, Args&&... args) {
  if (P.B.variable && P.C.variable) F<T, true, true>::run(P, args...);
  else if (P.B.variable) F<T, true, false>::run(P, args...);
  else if (P.C.variable) F<T, false, true>::run(P, args...);
  else F<T, false, false>::run(P, args...);
}

template <typename T, bool VB, bool VC>
struct Forward {
  static void run(const Problem<T>& P, Seq<T> out, T* last, T* ckpt) { forward<T, VB, VC>(P, out, last, ckpt); }
};

std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                                 bool softplus, bool want_last, bool want_ckpt,
                                 const std::optional<at::Tensor>& delta_proj) {
  std::vector<at::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "dmmh_selective_scan_fwd", [&] {
    const auto P = make_problem<scalar_t>(u, delta, A, B, C, D, z, bias, softplus, delta_proj);
    const int64_t nck = (P.l + kChunk - 1) / kChunk;
    at::Tensor out = empty_seq<scalar_t>(P.b, P.d, P.l, u);
    at::Tensor last = at::empty({want_last ? P.b : 0, P.d, P.n}, u.options());
    at::Tensor ckpt = at::empty({want_ckpt && nck > 1 ? P.b : 0, std::max<int64_t>(nck - 1, 0), P.d, P.n}, u.options());
    if (want_last && P.l == 0) last.zero_();
    dispatch_bc<scalar_t, Forward>(P, Seq<scalar_t>(out), want_last ? last.data_ptr<scalar_t>() : nullptr,
                                   want_ckpt && nck > 1 ? ckpt.data_ptr<scalar_t>() : nullptr);
    res = {out, last, ckpt};
  });
  return res;
}

// ---- backward

template <typename T>
struct Grads {
  Seq<const T> dout;
  const T* dlast;  // (b, d, n) contiguous or nullptr
  const T* ckpt;   // (b, nck - 1, d, n) contiguous or nullptr
  Seq<T> du, ddelta, dz;
  T *dB, *dC;                // variable: (b, G, n, l) contiguous; constant: per item (b, d, n)
  T *dA, *dD, *dbias;        // per item: (b, d, n), (b, d), (b, d)
};

// Work buffers of one task, W lanes wide: the per-chunk recomputation and the per-block accumulators.
template <typename T>
struct Work {
  static constexpr int W = kLanes<T>;
  int64_t n, nb;
  LaneVec<T> x, a, y, dt, dsp, accB, accC;  // chunk: states (kChunk + 1 steps), decays, y, dt, d softplus
  LaneVec<T> carry, dA, dBc, dCc, dD, dbias;  // per block: exp(dt A) g of the next step, accumulators
  Work(int64_t n_, int64_t nb_)
      : n(n_), nb(nb_), x((kChunk + 1) * n * W), a(kChunk * n * W), y(kChunk * W), dt(kChunk * W), dsp(kChunk * W),
        accB(kChunk * n * W), accC(kChunk * n * W), carry(nb * n * W), dA(nb * n * W), dBc(nb * n * W),
        dCc(nb * n * W), dD(nb * W), dbias(nb * W) {}
};

template <typename T, bool VB, bool VC>
void backward_task(const Problem<T>& P, const Grads<T>& G, int64_t b, int64_t g, const std::vector<Block<T>>& blocks,
                   Lanes<T>& L, Work<T>& ws) {
  constexpr int W = kLanes<T>;
  const int64_t n = P.n, nW = n * W, nb = static_cast<int64_t>(blocks.size());
  const int64_t nck = (P.l + kChunk - 1) / kChunk, c_off = g * P.group_size();
  for (auto* v : {&ws.carry, &ws.dA, &ws.dBc, &ws.dCc, &ws.dD, &ws.dbias}) std::fill(v->begin(), v->end(), T(0));
  if (G.dlast)
    for (int64_t j = 0; j < nb; ++j)
      for (int i = 0; i < blocks[j].w; ++i)
        for (int64_t k = 0; k < n; ++k) ws.carry[j * nW + k * W + i] = G.dlast[(b * P.d + c_off + blocks[j].c0 + i) * n + k];
  T uu[W], dtu[W], dy[W], zz[W], du[W], ddtu[W], dAx[W], dpre[W], dzv[W];
  for (int64_t ci = nck - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * kChunk, len = std::min(kChunk, P.l - t0);
    if (VB) std::fill(ws.accB.begin(), ws.accB.begin() + len * nW, T(0));
    if (VC) std::fill(ws.accC.begin(), ws.accC.begin() + len * nW, T(0));
    for (int64_t j = 0; j < nb; ++j) {
      Block<T> blk = blocks[j];
      blk.c0 += c_off;
      L.fill(P, blk);
      const T* Bv = variable_ptr(P.B, P, b, blk.c0);
      const T* Cv = variable_ptr(P.C, P, b, blk.c0);
      // recompute the chunk's states from the saved one
      T* x0 = ws.x.data();
      std::fill(x0, x0 + nW, T(0));
      if (ci > 0) rows_to_state(G.ckpt + ((b * (nck - 1) + ci - 1) * P.d + blk.c0) * n, x0, blk.w, n);
      for (int64_t s = 0; s < len; ++s) {
        T* dt = &ws.dt[s * W];
        step_dt(P, L, blk, b, t0 + s, dt, &ws.dsp[s * W]);
        load(uu, P.u.at(b, blk.c0, t0 + s), blk.w);
        FOR_LANES(i) dtu[i] = dt[i] * uu[i];
        T* xs = &ws.x[(s + 1) * nW];
        std::copy(xs - nW, xs, xs);
        step_state<T, VB, VC>(P, L, Bv, Cv, t0 + s, dt, dtu, xs, &ws.y[s * W], &ws.a[s * nW]);
      }
      // walk the chunk backwards
      T* carry = &ws.carry[j * nW];
      T* dA = &ws.dA[j * nW];
      T* dBc = &ws.dBc[j * nW];
      T* dCc = &ws.dCc[j * nW];
      for (int64_t s = len - 1; s >= 0; --s) {
        const int64_t t = t0 + s;
        const T* dt = &ws.dt[s * W];
        load(uu, P.u.at(b, blk.c0, t), blk.w);
        load(dy, G.dout.at(b, blk.c0, t), blk.w);
        FOR_LANES(i) dtu[i] = dt[i] * uu[i];
        if (P.z.p) {
          load(zz, P.z.at(b, blk.c0, t), blk.w);
          FOR_LANES(i) {
            const T sg = sigmoid(zz[i]), yd = ws.y[s * W + i] + L.D[i] * uu[i];
            dzv[i] = dy[i] * yd * sg * (T(1) + zz[i] * (T(1) - sg));
            dy[i] *= zz[i] * sg;
          }
          store(G.dz.at(b, blk.c0, t), dzv, blk.w);
        }
        FOR_LANES(i) {
          ws.dD[j * W + i] += dy[i] * uu[i];
          du[i] = dy[i] * L.D[i];
          ddtu[i] = T(0);
          dAx[i] = T(0);
        }
        const T* xprev = &ws.x[s * nW];
        const T* xt = &ws.x[(s + 1) * nW];
        const T* at = &ws.a[s * nW];
        for (int64_t k = 0; k < n; ++k) {
          const T bk = VB ? Bv[k * P.B.sn + t * P.B.sl] : T(0);
          const T ck = VC ? Cv[k * P.C.sn + t * P.C.sl] : T(0);
          const T* __restrict__ Ak = &L.A[k * W];
          const T* __restrict__ Bk = &L.Bc[k * W];
          const T* __restrict__ Ck = &L.Cc[k * W];
          const T* __restrict__ xpk = xprev + k * W;
          const T* __restrict__ xk = xt + k * W;
          const T* __restrict__ ak = at + k * W;
          T* __restrict__ gk = carry + k * W;
          T* __restrict__ dAk = dA + k * W;
          T* __restrict__ aB = VB ? &ws.accB[s * nW + k * W] : dBc + k * W;
          T* __restrict__ aC = VC ? &ws.accC[s * nW + k * W] : dCc + k * W;
          FOR_LANES(i) {
            const T gv = gk[i] + dy[i] * (VC ? ck : Ck[i]);  // d loss / d x_t
            aC[i] += dy[i] * xk[i];
            aB[i] += gv * dtu[i];
            ddtu[i] += gv * (VB ? bk : Bk[i]);
            const T wv = gv * xpk[i] * ak[i];  // d loss / d (dt A)
            dAx[i] += wv * Ak[i];
            dAk[i] += wv * dt[i];
            gk[i] = ak[i] * gv;
          }
        }
        const T* dsp = &ws.dsp[s * W];
        FOR_LANES(i) {
          du[i] += ddtu[i] * dt[i];
          dpre[i] = (ddtu[i] * uu[i] + dAx[i]) * dsp[i];
          ws.dbias[j * W + i] += dpre[i];
        }
        store(G.du.at(b, blk.c0, t), du, blk.w);
        store(G.ddelta.at(b, blk.c0, t), dpre, blk.w);
      }
    }
    // variable B/C: this task owns (b, g, :, t0:t0+len); sum the lanes of every block
    for (auto [on, acc, dst] : {std::tuple{VB, &ws.accB, G.dB}, std::tuple{VC, &ws.accC, G.dC}}) {
      if (!on) continue;
      for (int64_t s = 0; s < len; ++s)
        for (int64_t k = 0; k < n; ++k) {
          T sum = T(0);
          for (int i = 0; i < W; ++i) sum += (*acc)[s * nW + k * W + i];
          dst[((b * P.groups + g) * n + k) * P.l + t0 + s] = sum;
        }
    }
  }
  for (int64_t j = 0; j < nb; ++j)
    for (int i = 0; i < blocks[j].w; ++i) {
      const int64_t c = c_off + blocks[j].c0 + i;
      G.dD[b * P.d + c] = ws.dD[j * W + i];
      G.dbias[b * P.d + c] = ws.dbias[j * W + i];
      for (int64_t k = 0; k < n; ++k) {
        G.dA[(b * P.d + c) * n + k] = ws.dA[j * nW + k * W + i];
        if (!VB) G.dB[(b * P.d + c) * n + k] = ws.dBc[j * nW + k * W + i];
        if (!VC) G.dC[(b * P.d + c) * n + k] = ws.dCc[j * nW + k * W + i];
      }
    }
}

template <typename T, bool VB, bool VC>
struct Backward {
  static void run(const Problem<T>& P, const Grads<T>& G) {
    const auto blocks = group_blocks<T>(0, P.group_size());
    const int64_t nb = static_cast<int64_t>(blocks.size());
    parallel_tasks(P.b * P.groups, grain<T>(3 * P.l * P.n * P.group_size()), [&](int64_t begin, int64_t end) {
      FlushSubnormals ftz;
      Lanes<T> L(P.n);
      Work<T> ws(P.n, nb);
      for (int64_t task = begin; task < end; ++task)
        backward_task<T, VB, VC>(P, G, task / P.groups, task % P.groups, blocks, L, ws);
    });
  }
};

std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                                 bool softplus, const at::Tensor& dout, const std::optional<at::Tensor>& dlast,
                                 const std::optional<at::Tensor>& ckpt) {
  std::vector<at::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "dmmh_selective_scan_bwd", [&] {
    const auto P = make_problem<scalar_t>(u, delta, A, B, C, D, z, bias, softplus);
    const int64_t nck = (P.l + kChunk - 1) / kChunk;
    TORCH_CHECK(dout.scalar_type() == u.scalar_type() && dout.sizes() == u.sizes() && (dout.stride(1) == 1 || P.d <= 1),
                "dmmh selective scan: dout must be like u with contiguous channels");
    TORCH_CHECK(nck <= 1 || (ckpt && ckpt->is_contiguous() && ckpt->sizes() == at::IntArrayRef({P.b, nck - 1, P.d, P.n}) &&
                             ckpt->scalar_type() == u.scalar_type()),
                "dmmh selective scan: the backward needs the forward's saved states");
    TORCH_CHECK(!dlast || (dlast->is_contiguous() && dlast->sizes() == at::IntArrayRef({P.b, P.d, P.n}) &&
                           dlast->scalar_type() == u.scalar_type()),
                "dmmh selective scan: dlast must be contiguous (b, d, n)");
    auto opt = u.options();
    at::Tensor du = empty_seq<scalar_t>(P.b, P.d, P.l, u), ddelta = empty_seq<scalar_t>(P.b, P.d, P.l, u);
    at::Tensor dz = empty_seq<scalar_t>(z ? P.b : 0, P.d, P.l, u);
    auto grad_bc = [&](const at::Tensor& M) {
      return M.dim() == 4 ? at::empty({P.b, P.groups, P.n, P.l}, opt) : at::empty({P.b, P.d, P.n}, opt);
    };
    at::Tensor dB = grad_bc(B), dC = grad_bc(C);
    at::Tensor dA = at::empty({P.b, P.d, P.n}, opt), dD = at::empty({P.b, P.d}, opt), dbias = at::empty({P.b, P.d}, opt);
    Grads<scalar_t> G{Seq<const scalar_t>(dout),
                      dlast ? dlast->data_ptr<scalar_t>() : nullptr,
                      nck > 1 ? ckpt->data_ptr<scalar_t>() : nullptr,
                      Seq<scalar_t>(du), Seq<scalar_t>(ddelta), z ? Seq<scalar_t>(dz) : Seq<scalar_t>(),
                      dB.data_ptr<scalar_t>(), dC.data_ptr<scalar_t>(),
                      dA.data_ptr<scalar_t>(), dD.data_ptr<scalar_t>(), dbias.data_ptr<scalar_t>()};
    dispatch_bc<scalar_t, Backward>(P, G);
    // per-item partial sums of the parameters' gradients; constant B/C likewise
    res = {du, ddelta, dA.sum(0), B.dim() == 4 ? dB : dB.sum(0), C.dim() == 4 ? dC : dC.sum(0), dD.sum(0), dz,
           dbias.sum(0)};
  });
  return res;
}

// ---- causal depthwise convolution

template <typename T>
struct Conv {
  Seq<const T> x;
  const T* w;  // (d, K), any strides
  int64_t swd, swk;
  const T* bias;  // contiguous (d,) or nullptr
  int64_t b, d, l, K;
  bool silu;
};

template <typename T>
Conv<T> make_conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, bool silu) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu() && (x.stride(1) == 1 || x.size(1) <= 1),
              "dmmh causal conv1d: x must be a CPU (b, d, l) tensor with contiguous channels, got sizes ", x.sizes(),
              " strides ", x.strides());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.size(1) >= 1 && w.scalar_type() == x.scalar_type(),
              "dmmh causal conv1d: weight must be (d, width) of x's dtype");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == x.size(1) && bias->is_contiguous() &&
                        bias->scalar_type() == x.scalar_type()),
              "dmmh causal conv1d: bias must be contiguous (d,) of x's dtype");
  return {Seq<const T>(x), w.data_ptr<T>(), w.stride(0), w.stride(1), bias ? bias->data_ptr<T>() : nullptr,
          x.size(0), x.size(1), x.size(2), w.size(1), silu};
}

template <typename T>
void conv_lanes(const Conv<T>& P, const Block<T>& blk, T* wl, T* bl) {  // weights lane-major: wl[k * W + i]
  constexpr int W = kLanes<T>;
  for (int64_t k = 0; k < P.K; ++k)
    for (int i = 0; i < W; ++i) wl[k * W + i] = i < blk.w ? P.w[(blk.c0 + i) * P.swd + k * P.swk] : T(0);
  for (int i = 0; i < W; ++i) bl[i] = P.bias && i < blk.w ? P.bias[blk.c0 + i] : T(0);
}

// pre = bias + sum_k w_k x_{t-K+1+k}, from the window xw[k] = x_{t-K+1+k}
template <typename T>
LANE_FN void conv_pre(const Conv<T>& P, const T* __restrict__ wl, const T* __restrict__ bl, const T* __restrict__ xw,
                      T* __restrict__ pre) {
  constexpr int W = kLanes<T>;
  FOR_LANES(i) pre[i] = bl[i];
  for (int64_t k = 0; k < P.K; ++k) FOR_LANES(i) pre[i] += wl[k * W + i] * xw[k * W + i];
}

// Step by step along each item: a step's output row is bias + sum_k w_k * (input row t-K+1+k), each a loop
// over the contiguous channels (SIMD), the rows in cache; taps before the first step are skipped (zeros).
template <typename T>
void conv_forward(const Conv<T>& P, Seq<T> out) {
  const int64_t d = P.d, K = P.K;
  std::vector<T> wt(K * d), bz(d, T(0));  // weights tap-major: wt[k * d + c]
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t k = 0; k < K; ++k) wt[k * d + c] = P.w[c * P.swd + k * P.swk];
    if (P.bias) bz[c] = P.bias[c];
  }
  const int64_t per_item = (P.l + kChunk - 1) / kChunk;  // tasks: kChunk steps of one item
  parallel_tasks(P.b * per_item, grain<T>(kChunk * K * d), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_item, t0 = task % per_item * kChunk, t1 = std::min(P.l, t0 + kChunk);
      for (int64_t t = t0; t < t1; ++t) {
        if (t + 4 < t1)  // the input row needed 4 steps on (rows are strided views, fresh from a matrix product)
          for (int64_t c = 0; c < d; c += 64 / sizeof(T)) __builtin_prefetch(P.x.at(b, c, t + 4), 0, 3);
        T* __restrict__ o = out.at(b, 0, t);
        const T* __restrict__ bias = bz.data();
        _Pragma("omp simd") for (int64_t c = 0; c < d; ++c) o[c] = bias[c];
        for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
          const T* __restrict__ xk = P.x.at(b, 0, t - K + 1 + k);
          const T* __restrict__ wk = wt.data() + k * d;
          _Pragma("omp simd") for (int64_t c = 0; c < d; ++c) o[c] += wk[c] * xk[c];
        }
        if (P.silu) _Pragma("omp simd") for (int64_t c = 0; c < d; ++c) o[c] *= sigmoid(o[c]);
      }
    }
  });
}

// Walks each row backwards with windows of inputs (x_{t-K+1..t}) and of output gradients (g_{t..t+K-1}).
template <typename T>
void conv_backward(const Conv<T>& P, Seq<const T> dout, Seq<T> dx, T* dw, T* dbias) {
  constexpr int W = kLanes<T>;
  const auto blocks = group_blocks<T>(0, P.d);
  const int64_t nb = static_cast<int64_t>(blocks.size()), K = P.K;
  parallel_tasks(P.b * nb, grain<T>(3 * P.l * P.K * W), [&](int64_t begin, int64_t end) {
    LaneVec<T> wl(K * W), xw(K * W), gw(K * W), dwl(K * W);
    T bl[W], pre[W], g[W], dxv[W], dbl[W];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nb;
      const Block<T>& blk = blocks[task % nb];
      conv_lanes(P, blk, wl.data(), bl);
      std::fill(gw.begin(), gw.end(), T(0));
      std::fill(dwl.begin(), dwl.end(), T(0));
      FOR_LANES(i) dbl[i] = T(0);
      for (int64_t k = 0; k < K; ++k) {  // inputs of the last step
        const int64_t s = P.l - K + k;
        if (s >= 0) load(&xw[k * W], P.x.at(b, blk.c0, s), blk.w);
        else std::fill(&xw[k * W], &xw[k * W] + W, T(0));
      }
      for (int64_t t = P.l - 1; t >= 0; --t) {
        conv_pre(P, wl.data(), bl, xw.data(), pre);
        load(g, dout.at(b, blk.c0, t), blk.w);
        if (P.silu)
          FOR_LANES(i) {
            const T s = sigmoid(pre[i]);
            g[i] *= s * (T(1) + pre[i] * (T(1) - s));
          }
        std::copy_backward(gw.begin(), gw.end() - W, gw.end());  // gw[j] = g_{t+j}
        std::copy(g, g + W, gw.begin());
        FOR_LANES(i) {
          dxv[i] = T(0);
          dbl[i] += g[i];
        }
        for (int64_t k = 0; k < K; ++k) {
          FOR_LANES(i) {
            dxv[i] += wl[k * W + i] * gw[(K - 1 - k) * W + i];
            dwl[k * W + i] += g[i] * xw[k * W + i];
          }
        }
        store(dx.at(b, blk.c0, t), dxv, blk.w);
        std::copy_backward(xw.begin(), xw.end() - W, xw.end());  // the window of step t - 1
        if (t - K >= 0) load(&xw[0], P.x.at(b, blk.c0, t - K), blk.w);
        else std::fill(xw.begin(), xw.begin() + W, T(0));
      }
      for (int i = 0; i < blk.w; ++i) {
        const int64_t c = blk.c0 + i;
        if (dbias) dbias[b * P.d + c] = dbl[i];
        for (int64_t k = 0; k < K; ++k) dw[(b * P.d + c) * K + k] = dwl[k * W + i];
      }
    }
  });
}

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, bool silu) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dmmh_causal_conv1d_fwd", [&] {
    const auto P = make_conv<scalar_t>(x, w, bias, silu);
    out = empty_seq<scalar_t>(P.b, P.d, P.l, x);
    conv_forward(P, Seq<scalar_t>(out));
  });
  return out;
}

std::vector<at::Tensor> conv_bwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                 bool silu, const at::Tensor& dout) {
  std::vector<at::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dmmh_causal_conv1d_bwd", [&] {
    const auto P = make_conv<scalar_t>(x, w, bias, silu);
    TORCH_CHECK(dout.scalar_type() == x.scalar_type() && dout.sizes() == x.sizes() && (dout.stride(1) == 1 || P.d <= 1),
                "dmmh causal conv1d: dout must be like x with contiguous channels");
    at::Tensor dx = empty_seq<scalar_t>(P.b, P.d, P.l, x);
    at::Tensor dw = at::empty({P.b, P.d, P.K}, x.options());
    at::Tensor db = at::empty({bias ? P.b : 0, P.d}, x.options());
    conv_backward(P, Seq<const scalar_t>(dout), Seq<scalar_t>(dx), dw.data_ptr<scalar_t>(),
                  bias ? db.data_ptr<scalar_t>() : nullptr);
    res = {dx, dw.sum(0), db.sum(0)};
  });
  return res;
}

}  // namespace

// The operators' schemas are defined in Python (dmmh/ops/_cpp.py), so that they exist before this library
// is built; it registers their CPU implementations.
TORCH_LIBRARY_IMPL(dmmh, CPU, m) {
  m.impl("selective_scan_fwd", &scan_fwd);
  m.impl("selective_scan_bwd", &scan_bwd);
  m.impl("causal_conv1d_fwd", &conv_fwd);
  m.impl("causal_conv1d_bwd", &conv_bwd);
}
