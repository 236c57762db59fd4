// CPU kernels of multi-scale deformable attention: float32 and float64 values, and bfloat16 and
// float16 values read and written in their own dtype with float32 arithmetic (locations, weights
// and the value-gradient sums are float32 for them).
//
// Sampling follows grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): a
// normalised location x in [0, 1] maps to the pixel coordinate x * W - 0.5, and corners outside the
// level contribute zero.
//
// The forward pass is bound by the latency of reading value rows at random places, so it keeps as
// many of those reads in flight as it can: walking one head, it locates the rows of query q + 1 and
// prefetches them before it sums query q, and it prefetches the inputs of queries a few steps ahead
// (num_heads rows apart, a stride the hardware prefetchers miss). Corners outside the level read a
// row of zeros instead of taking a branch that random locations would mispredict.
//
// The backward pass splits the work by (batch, head): each task owns the value gradient of its head
// and the head's location and weight gradients, so no two threads ever write the same element, no
// atomics are needed and the sums do not depend on the thread count. Like the forward, it locates
// and prefetches the rows of query q + 1 (values and gradient sums) before it works on query q.
// Sparse heads (few samples per row) sum straight into one zeroed buffer of the arithmetic dtype
// (grad_value itself, or a float32 buffer cast to 16-bit grad_value at the end); for dense heads
// each thread sums one head at a time into its own dense buffer and converts it into grad_value
// when the head is done.
//
// When a head takes more samples than it has rows, value is first transposed to (N, M, S, D): rows
// M * D elements apart use only a fraction of the cache sets, while a dense head stays in cache.
//
// On x86 the per-head loops are compiled three times (baseline, AVX2+FMA+F16C, AVX-512) and the
// widest one the CPU supports is picked at run time, so the extension stays portable.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "ms_deform_attn.h"

#if defined(__GNUC__) && !defined(__clang__)
// Vector-extension helpers are always inlined, so the ABI of vector arguments never matters.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DDETR_X86_MULTIVERSION 1
// The helpers must be inlined into each ISA-specific caller to be compiled for its ISA.
#define DDETR_INLINE inline __attribute__((always_inline))
#else
#define DDETR_INLINE inline
#endif

namespace deformable_detr {

namespace {

struct Level {
  int64_t height;
  int64_t width;
  int64_t start;
};

std::vector<Level> read_levels(const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index) {
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  std::vector<Level> levels(shapes.size(0));
  for (size_t l = 0; l < levels.size(); ++l) {
    levels[l] = {hw[2 * l], hw[2 * l + 1], start[l]};
  }
  return levels;
}

// Everything one task needs. V is the dtype of value, output and grad_output; T the arithmetic
// type of locations, weights and sums. Pointers are to the whole contiguous tensors, except
// head_value (row 0 of the head, rows `row` elements apart), zero_row (dim zeros), head_grad
// (row 0 of the head's value-gradient sum, rows `grad_row` elements apart) and grad_sink (dim
// elements that absorb the sums of corners outside the level). When grad_value is set, head_grad
// is the task's own dense buffer: the backward zeroes it first and converts it into grad_value
// (N, S, M, D) at the end; otherwise head_grad points into a zeroed grad_value.
template <typename V, typename T>
struct HeadTask {
  const V* head_value;
  int64_t row;
  const V* zero_row;
  const Level* levels;
  int64_t num_levels;
  const T* locations;
  const T* weights;
  V* output;
  const V* grad_output;
  T* head_grad;
  int64_t grad_row;
  T* grad_sink;
  V* grad_value;
  int64_t num_rows;
  T* grad_locations;
  T* grad_weights;
  int64_t num_queries;
  int64_t num_heads;
  int64_t dim;
  int64_t num_points;
  int64_t n;
  int64_t m;
  int64_t q_begin;
  int64_t q_end;
};

// The four corners of one bilinear sample: row indices into the head's values, interpolation
// weights and whether each corner lies inside the level.
template <typename T>
struct Corners {
  int64_t index[4];
  T weight[4];
  bool valid[4];
  // Fractional parts of the pixel coordinates, kept for the location gradient.
  T lh, lw;
};

// Returns false when the sample falls entirely outside the level (or is NaN).
template <typename T>
DDETR_INLINE bool bilinear_corners(T x, T y, const Level& level, Corners<T>& c) {
  const T h_im = y * static_cast<T>(level.height) - static_cast<T>(0.5);
  const T w_im = x * static_cast<T>(level.width) - static_cast<T>(0.5);
  if (!(h_im > -1 && w_im > -1 && h_im < level.height && w_im < level.width)) {
    return false;
  }
  const T h_floor = std::floor(h_im), w_floor = std::floor(w_im);
  const int64_t h_low = static_cast<int64_t>(h_floor), w_low = static_cast<int64_t>(w_floor);
  c.lh = h_im - h_floor;
  c.lw = w_im - w_floor;
  const T hh = 1 - c.lh, hw = 1 - c.lw;
  const bool top = h_low >= 0, bottom = h_low + 1 < level.height;
  const bool left = w_low >= 0, right = w_low + 1 < level.width;
  c.valid[0] = top && left;
  c.valid[1] = top && right;
  c.valid[2] = bottom && left;
  c.valid[3] = bottom && right;
  c.weight[0] = hh * hw;
  c.weight[1] = hh * c.lw;
  c.weight[2] = c.lh * hw;
  c.weight[3] = c.lh * c.lw;
  const int64_t base = level.start + h_low * level.width + w_low;
  c.index[0] = base;
  c.index[1] = base + 1;
  c.index[2] = base + level.width;
  c.index[3] = base + level.width + 1;
  return true;
}

#if defined(__GNUC__)
// A vector of kBytes bytes of E. A typedef with a non-dependent element type and a dependent size
// would lose its vector attribute inside a class template (GCC), hence this indirection.
template <typename E, int kBytes>
struct Simd {
  typedef E type __attribute__((vector_size(kBytes)));
};
#endif

// A channel row of kDim elements of type T held in kDim / kLen SIMD vectors of kBytes bytes
// (GCC/Clang vector extensions, compiled to the widest registers of the calling function's
// target). Local vectors stay in registers, which an array of scalars behind a pointer does not.
// Loads and stores convert from and to the storage type V: bfloat16 by bit shifts (stores round to
// nearest even, like c10::BFloat16), float16 by the F16C conversions where the target has them.
template <typename T, int kDim, int kBytes>
struct Row {
#if defined(__GNUC__)
  static constexpr int kLen = kBytes / static_cast<int>(sizeof(T));
  typedef T Vec __attribute__((vector_size(kBytes)));
  typedef typename Simd<uint32_t, kBytes>::type Bits;
#else
  static constexpr int kLen = 1;
  typedef T Vec;
#endif
  static constexpr int kCount = kDim / kLen;
  static_assert(kDim % kLen == 0, "the channel count must be a multiple of the vector length");
  Vec v[kCount];

#if defined(__GNUC__)
  // 16-bit patterns to and from 32-bit lanes.
  DDETR_INLINE static Bits widen(const void* p) {
    uint16_t h[kLen];
    std::memcpy(h, p, sizeof(h));
    Bits b;
    for (int i = 0; i < kLen; ++i) {
      b[i] = h[i];
    }
    return b;
  }
  DDETR_INLINE static void narrow(void* p, const Bits& b) {
    uint16_t h[kLen];
    for (int i = 0; i < kLen; ++i) {
      h[i] = static_cast<uint16_t>(b[i]);
    }
    std::memcpy(p, h, sizeof(h));
  }
#endif

  template <typename V>
  DDETR_INLINE static Vec load(const V* p) {
    Vec x;
    if constexpr (std::is_same_v<V, T>) {
      std::memcpy(&x, p, sizeof(Vec));
#if defined(__GNUC__)
    } else if constexpr (std::is_same_v<V, c10::BFloat16>) {
      static_assert(std::is_same_v<T, float>);
      const Bits b = widen(p) << 16;
      std::memcpy(&x, &b, sizeof(Vec));
    } else if constexpr (std::is_same_v<V, c10::Half>) {
      static_assert(std::is_same_v<T, float>);
      const Bits b = widen(p);
      // Exponent and mantissa moved into float32 position, then rescaled by 2^112: exact for
      // normal and subnormal halves; infinities and NaNs get the all-ones exponent.
      const Bits magnitude = (b & 0x7FFF) << 13;
      Vec f;
      std::memcpy(&f, &magnitude, sizeof(Vec));
      f *= 0x1p112f;
      Bits out;
      std::memcpy(&out, &f, sizeof(Vec));
      out |= (Bits)((b & 0x7C00) == 0x7C00) & 0x7F800000;
      out |= (b & 0x8000) << 16;
      std::memcpy(&x, &out, sizeof(Vec));
#endif
    } else {
      static_assert(!sizeof(V), "unsupported storage type");
    }
    return x;
  }
  template <typename V>
  DDETR_INLINE static void store(V* p, const Vec& x) {
    if constexpr (std::is_same_v<V, T>) {
      std::memcpy(p, &x, sizeof(Vec));
#if defined(__GNUC__)
    } else if constexpr (std::is_same_v<V, c10::BFloat16>) {
      Bits b;
      std::memcpy(&b, &x, sizeof(b));
      // Round to nearest even; NaN becomes the canonical quiet NaN.
      b = (b + (((b >> 16) & 1) + 0x7FFF)) >> 16;
      const Bits nan = (Bits)(x != x);
      b = (b & ~nan) | ((Bits{} + 0x7FC0) & nan);
      narrow(p, b);
    } else if constexpr (std::is_same_v<V, c10::Half>) {
      // Round to nearest even like c10::Half: overflow to infinity, NaN to 0x7E00 with its sign,
      // subnormal results rounded by the float adder.
      Bits b;
      std::memcpy(&b, &x, sizeof(b));
      const Bits sign = b & 0x80000000u;
      b ^= sign;
      const Bits big = (Bits)(b >= ((127u + 16u) << 23));
      const Bits special = 0x7C00 | ((Bits)(b > (255u << 23)) & 0x0200);
      const Bits tiny = (Bits)(b < (113u << 23));
      constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
      Vec f;
      std::memcpy(&f, &b, sizeof(Vec));
      // Adding 0.5 (the float with exponent kDenormMagic) aligns the half's subnormal bits.
      f += 0.5f;
      Bits sub;
      std::memcpy(&sub, &f, sizeof(Vec));
      const Bits normal = (b + ((15u - 127u) << 23) + 0xFFF + ((b >> 13) & 1)) >> 13;
      Bits r = (big & special) | (~big & ((tiny & (sub - kDenormMagic)) | (~tiny & normal)));
      r |= sign >> 16;
      narrow(p, r);
#endif
    } else {
      static_assert(!sizeof(V), "unsupported storage type");
    }
  }
  DDETR_INLINE static T sum(const Vec& x) {
#if defined(__GNUC__)
    return halving_sum<kLen>(x);
#else
    return x;
#endif
  }
#if defined(__GNUC__)
  // The lanes of x summed by adding its halves until one lane is left: log2(kLen) vector adds,
  // where a lane-by-lane loop takes kLen dependent scalar adds and as many lane extractions.
  template <int kLanes, typename X>
  DDETR_INLINE static T halving_sum(const X& x) {
    if constexpr (kLanes == 1) {
      return x[0];
    } else {
      typedef typename Simd<T, kLanes / 2 * static_cast<int>(sizeof(T))>::type Half;
      Half lo, hi;
      std::memcpy(&lo, &x, sizeof(Half));
      std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(Half), sizeof(Half));
      return halving_sum<kLanes / 2>(lo + hi);
    }
  }
#endif
  DDETR_INLINE void zero() {
    for (int j = 0; j < kCount; ++j) {
      v[j] = Vec{} * 0;
    }
  }
  template <typename V>
  DDETR_INLINE void load_from(const V* p) {
    for (int j = 0; j < kCount; ++j) {
      v[j] = load(p + j * kLen);
    }
  }
  template <typename V>
  DDETR_INLINE void store_to(V* p) const {
    for (int j = 0; j < kCount; ++j) {
      store(p + j * kLen, v[j]);
    }
  }
  // this += w * p[0:kDim]
  template <typename V>
  DDETR_INLINE void add_scaled(T w, const V* p) {
    for (int j = 0; j < kCount; ++j) {
      v[j] += w * load(p + j * kLen);
    }
  }
  // p[0:kDim] += w * this
  DDETR_INLINE void add_scaled_to(T w, T* p) const {
    for (int j = 0; j < kCount; ++j) {
      store(p + j * kLen, load(p + j * kLen) + w * v[j]);
    }
  }
  // this . p[0:kDim]
  template <typename V>
  DDETR_INLINE T dot(const V* p) const {
    Vec acc = v[0] * load(p);
    for (int j = 1; j < kCount; ++j) {
      acc += v[j] * load(p + j * kLen);
    }
    return sum(acc);
  }
};

// One value row of a forward sample and its weight (attention weight times bilinear weight).
template <typename V, typename T>
struct Tap {
  const V* row;
  T weight;
};

// Queries ahead of the current one whose locations, weights and output rows are prefetched: the
// per-head walk reads them num_heads rows apart, a stride the hardware prefetchers miss.
constexpr int64_t kPrefetchQueries = 8;

DDETR_INLINE void prefetch_bytes(const void* p, int64_t bytes, bool write) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) {
    if (write) {
      __builtin_prefetch(c + b, 1, 3);
    } else {
      __builtin_prefetch(c + b, 0, 3);
    }
  }
#endif
}

// Computes the value rows of query q's samples into taps (in the order the sum visits them) and
// prefetches them; returns how many there are. Corners outside the level get the zero row.
template <typename V, typename T>
DDETR_INLINE int64_t gather_taps(const HeadTask<V, T>& t, int64_t q, int64_t row_bytes,
                                 Tap<V, T>* taps) {
  const int64_t samples = t.num_levels * t.num_points;
  const int64_t pair = (t.n * t.num_queries + q) * t.num_heads + t.m;
  const T* loc = t.locations + 2 * pair * samples;
  const T* attn = t.weights + pair * samples;
  int64_t count = 0;
  for (int64_t l = 0; l < t.num_levels; ++l) {
    const Level& level = t.levels[l];
    for (int64_t p = 0; p < t.num_points; ++p, loc += 2, ++attn) {
      Corners<T> c;
      if (!bilinear_corners(loc[0], loc[1], level, c)) {
        continue;
      }
      const T a = *attn;
      for (int k = 0; k < 4; ++k) {
        const V* r = c.valid[k] ? t.head_value + c.index[k] * t.row : t.zero_row;
        taps[count++] = {r, c.valid[k] ? a * c.weight[k] : T(0)};
        prefetch_bytes(r, row_bytes, false);
      }
    }
  }
  return count;
}

// Forward pass of one head for the queries [q_begin, q_end). kDim > 0 fixes the channel count at
// compile time (vector registers of kBytes bytes); kDim == 0 reads it from the task and sums into
// `scratch` (dim elements). The rows of query q + 1 are located and prefetched before query q is
// summed, so their loads overlap.
template <typename V, typename T, int kDim, int kBytes>
DDETR_INLINE void forward_head(const HeadTask<V, T>& t, Tap<V, T>* buffer, T* scratch) {
  const int64_t dim = kDim > 0 ? kDim : t.dim;
  const int64_t samples = t.num_levels * t.num_points;
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(V));
  Tap<V, T>* cur = buffer;
  Tap<V, T>* next = buffer + 4 * samples;
  int64_t cur_count = t.q_begin < t.q_end ? gather_taps(t, t.q_begin, row_bytes, cur) : 0;
  for (int64_t q = t.q_begin; q < t.q_end; ++q) {
    const int64_t pair = (t.n * t.num_queries + q) * t.num_heads + t.m;
    V* __restrict out = t.output + pair * dim;
    if (q + 1 + kPrefetchQueries < t.q_end) {
      const int64_t ahead = pair + t.num_heads * (1 + kPrefetchQueries);
      prefetch_bytes(t.locations + 2 * ahead * samples, 2 * samples * sizeof(T), false);
      prefetch_bytes(t.weights + ahead * samples, samples * sizeof(T), false);
      prefetch_bytes(t.output + ahead * dim, row_bytes, true);
    }
    const int64_t next_count = q + 1 < t.q_end ? gather_taps(t, q + 1, row_bytes, next) : 0;
    if constexpr (kDim > 0) {
      Row<T, kDim, kBytes> acc;
      acc.zero();
      for (int64_t e = 0; e < cur_count; ++e) {
        acc.add_scaled(cur[e].weight, cur[e].row);
      }
      acc.store_to(out);
    } else {
      std::fill(scratch, scratch + dim, T(0));
      for (int64_t e = 0; e < cur_count; ++e) {
        const T w = cur[e].weight;
        const V* __restrict v = cur[e].row;
        for (int64_t i = 0; i < dim; ++i) {
          scratch[i] += w * static_cast<T>(v[i]);
        }
      }
      for (int64_t i = 0; i < dim; ++i) {
        out[i] = static_cast<V>(scratch[i]);
      }
    }
    std::swap(cur, next);
    cur_count = next_count;
  }
}

// The four corners of one backward sample: value rows (the zero row outside the level), gradient
// rows (the sink outside), bilinear weights (zero outside) and the fractional parts of the pixel
// coordinates (zero for a sample entirely outside, whose gradients then come out zero).
template <typename V, typename T>
struct GradSample {
  const V* value[4];
  T* grad[4];
  T weight[4];
  bool valid[4];
  T lh, lw;
};

// Fills samples with the corners of query q's samples and prefetches their value and gradient
// rows, so that their cache misses overlap the work on the query before.
template <typename V, typename T>
DDETR_INLINE void gather_grad_samples(const HeadTask<V, T>& t, int64_t q, int64_t row_bytes,
                                      int64_t grad_bytes, GradSample<V, T>* samples) {
  const int64_t pair = (t.n * t.num_queries + q) * t.num_heads + t.m;
  const T* loc = t.locations + 2 * pair * t.num_levels * t.num_points;
  for (int64_t l = 0; l < t.num_levels; ++l) {
    const Level& level = t.levels[l];
    for (int64_t p = 0; p < t.num_points; ++p, loc += 2, ++samples) {
      Corners<T> c;
      if (!bilinear_corners(loc[0], loc[1], level, c)) {
        c.lh = 0;
        c.lw = 0;
        for (int k = 0; k < 4; ++k) {
          c.valid[k] = false;
        }
      }
      samples->lh = c.lh;
      samples->lw = c.lw;
      for (int k = 0; k < 4; ++k) {
        const bool valid = c.valid[k];
        samples->valid[k] = valid;
        samples->weight[k] = valid ? c.weight[k] : T(0);
        samples->value[k] = valid ? t.head_value + c.index[k] * t.row : t.zero_row;
        samples->grad[k] = valid ? t.head_grad + c.index[k] * t.grad_row : t.grad_sink;
        if (valid) {
          prefetch_bytes(samples->value[k], row_bytes, false);
          prefetch_bytes(samples->grad[k], grad_bytes, true);
        }
      }
    }
  }
}

// Backward pass of one head over all queries: sums the value gradient into head_grad (converted
// into grad_value at the end when that is set) and writes the location and weight gradients. The
// corners of query q + 1 are located and their rows prefetched before query q is processed.
// `buffer` holds two queries' samples; `scratch` dim elements (generic path).
template <typename V, typename T, int kDim, int kBytes>
DDETR_INLINE void backward_head(const HeadTask<V, T>& t, GradSample<V, T>* buffer, T* scratch) {
  const int64_t dim = kDim > 0 ? kDim : t.dim;
  const int64_t samples = t.num_levels * t.num_points;
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(V));
  const int64_t grad_bytes = dim * static_cast<int64_t>(sizeof(T));
  using GradRow = Row<T, (kDim > 0 ? kDim : kBytes / sizeof(T)), kBytes>;
  if (t.grad_value != nullptr) {
    std::fill(t.head_grad, t.head_grad + t.num_rows * t.grad_row, T(0));
  }
  GradSample<V, T>* cur = buffer;
  GradSample<V, T>* next = buffer + samples;
  if (t.num_queries > 0) {
    gather_grad_samples(t, 0, row_bytes, grad_bytes, cur);
  }
  for (int64_t q = 0; q < t.num_queries; ++q) {
    const int64_t pair = (t.n * t.num_queries + q) * t.num_heads + t.m;
    if (q + 1 + kPrefetchQueries < t.num_queries) {
      const int64_t ahead = pair + t.num_heads * (1 + kPrefetchQueries);
      prefetch_bytes(t.locations + 2 * ahead * samples, 2 * samples * sizeof(T), false);
      prefetch_bytes(t.weights + ahead * samples, samples * sizeof(T), false);
      prefetch_bytes(t.grad_output + ahead * dim, row_bytes, false);
      prefetch_bytes(t.grad_locations + 2 * ahead * samples, 2 * samples * sizeof(T), true);
      prefetch_bytes(t.grad_weights + ahead * samples, samples * sizeof(T), true);
    }
    if (q + 1 < t.num_queries) {
      gather_grad_samples(t, q + 1, row_bytes, grad_bytes, next);
    }
    const V* __restrict g = t.grad_output + pair * dim;
    GradRow g_row;
    if constexpr (kDim > 0) {
      g_row.load_from(g);
    } else {
      for (int64_t i = 0; i < dim; ++i) {
        scratch[i] = static_cast<T>(g[i]);
      }
    }
    const T* attn = t.weights + pair * samples;
    T* grad_loc = t.grad_locations + 2 * pair * samples;
    T* grad_attn = t.grad_weights + pair * samples;
    for (int64_t l = 0; l < t.num_levels; ++l) {
      const T width = static_cast<T>(t.levels[l].width);
      const T height = static_cast<T>(t.levels[l].height);
      for (int64_t p = 0; p < t.num_points; ++p) {
        const int64_t i = l * t.num_points + p;
        const GradSample<V, T>& c = cur[i];
        const T a = attn[i];
        // g . v for every corner; the three gradients are linear combinations of these. Corners
        // outside read the zero row and add into the sink; their dot is forced to zero so that
        // an infinite output gradient does not turn into a NaN there.
        T dots[4];
        for (int k = 0; k < 4; ++k) {
          T dot;
          if constexpr (kDim > 0) {
            dot = g_row.dot(c.value[k]);
            g_row.add_scaled_to(a * c.weight[k], c.grad[k]);
          } else {
            const V* __restrict v = c.value[k];
            T* __restrict gv = c.grad[k];
            const T w = a * c.weight[k];
            dot = 0;
            for (int64_t j = 0; j < dim; ++j) {
              dot += scratch[j] * static_cast<T>(v[j]);
            }
            for (int64_t j = 0; j < dim; ++j) {
              gv[j] += w * scratch[j];
            }
          }
          dots[k] = c.valid[k] ? dot : T(0);
        }
        const T hh = 1 - c.lh, hw = 1 - c.lw;
        grad_attn[i] = c.weight[0] * dots[0] + c.weight[1] * dots[1] + c.weight[2] * dots[2] +
                       c.weight[3] * dots[3];
        // The chain rule through pixel = location * size - 0.5 multiplies by the level size.
        const T dw = hh * (dots[1] - dots[0]) + c.lh * (dots[3] - dots[2]);
        const T dh = hw * (dots[2] - dots[0]) + c.lw * (dots[3] - dots[1]);
        grad_loc[2 * i] = a * dw * width;
        grad_loc[2 * i + 1] = a * dh * height;
      }
    }
    std::swap(cur, next);
  }
  if (t.grad_value != nullptr) {
    // Converting while the rows are scattered back to (N, S, M, D) reads the buffer once.
    const int64_t out_row = t.num_heads * dim;
    V* out = t.grad_value + t.n * t.num_rows * out_row + t.m * dim;
    const T* src = t.head_grad;
    for (int64_t r = 0; r < t.num_rows; ++r, src += t.grad_row, out += out_row) {
      if constexpr (kDim > 0) {
        GradRow x;
        x.load_from(src);
        x.store_to(out);
      } else {
        for (int64_t j = 0; j < dim; ++j) {
          out[j] = static_cast<V>(src[j]);
        }
      }
    }
  }
}

template <typename V, typename T, int kDim>
void forward_head_baseline(const HeadTask<V, T>& t, Tap<V, T>* buffer, T* scratch) {
  forward_head<V, T, kDim, 16>(t, buffer, scratch);
}

template <typename V, typename T, int kDim>
void backward_head_baseline(const HeadTask<V, T>& t, GradSample<V, T>* buffer, T* scratch) {
  backward_head<V, T, kDim, 16>(t, buffer, scratch);
}

#ifdef DDETR_X86_MULTIVERSION
template <typename V, typename T, int kDim>
__attribute__((target("avx2,fma,f16c"))) void forward_head_avx2(const HeadTask<V, T>& t,
                                                                Tap<V, T>* buffer, T* scratch) {
  forward_head<V, T, kDim, 32>(t, buffer, scratch);
}

template <typename V, typename T, int kDim>
__attribute__((target("avx2,fma,f16c"))) void backward_head_avx2(const HeadTask<V, T>& t,
                                                                 GradSample<V, T>* buffer,
                                                                 T* scratch) {
  backward_head<V, T, kDim, 32>(t, buffer, scratch);
}

template <typename V, typename T, int kDim>
__attribute__((target("avx512f,avx512vl,avx2,fma,f16c"))) void forward_head_avx512(
    const HeadTask<V, T>& t, Tap<V, T>* buffer, T* scratch) {
  forward_head<V, T, kDim, 64>(t, buffer, scratch);
}

template <typename V, typename T, int kDim>
__attribute__((target("avx512f,avx512vl,avx2,fma,f16c"))) void backward_head_avx512(
    const HeadTask<V, T>& t, GradSample<V, T>* buffer, T* scratch) {
  backward_head<V, T, kDim, 64>(t, buffer, scratch);
}
#endif

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa cpu_isa() {
#ifdef DDETR_X86_MULTIVERSION
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("f16c")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      return Isa::kAvx2;
    }
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

template <typename V, typename T, int kDim>
void run_forward_head(const HeadTask<V, T>& t, Tap<V, T>* buffer, T* scratch) {
#ifdef DDETR_X86_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return forward_head_avx512<V, T, kDim>(t, buffer, scratch);
    case Isa::kAvx2:
      return forward_head_avx2<V, T, kDim>(t, buffer, scratch);
    default:
      break;
  }
#endif
  forward_head_baseline<V, T, kDim>(t, buffer, scratch);
}

template <typename V, typename T, int kDim>
void run_backward_head(const HeadTask<V, T>& t, GradSample<V, T>* buffer, T* scratch) {
#ifdef DDETR_X86_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return backward_head_avx512<V, T, kDim>(t, buffer, scratch);
    case Isa::kAvx2:
      return backward_head_avx2<V, T, kDim>(t, buffer, scratch);
    default:
      break;
  }
#endif
  backward_head_baseline<V, T, kDim>(t, buffer, scratch);
}

// Arithmetic dtype of the kernels: float32 for 16-bit values.
at::ScalarType compute_type(const at::Tensor& value) {
  return at::toOpMathType(value.scalar_type());
}

void check_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
               const at::Tensor& attention_weights, const char* op_name) {
  check_ms_deform_attn_metadata(value, spatial_shapes, level_start_index, sampling_locations,
                                attention_weights, op_name);
  TORCH_CHECK(value.device().is_cpu(), op_name, ": expected CPU tensors, got ", value.device());
  check_ms_deform_attn_levels(spatial_shapes, level_start_index, value.size(1), op_name);
}

// The dense copy pays for itself once the head takes at least one sample per row.
bool worth_packing(int64_t num_queries, int64_t num_levels, int64_t num_points, int64_t num_rows,
                   int64_t num_heads) {
  return num_heads > 1 && num_queries * num_levels * num_points >= num_rows;
}

// Copies src (N, A, B, D) into dst (N, B, A, D) of the same dtype, row by row, which is cheaper
// than the generic strided copy.
void swap_middle(const at::Tensor& src, at::Tensor& dst) {
  const int64_t n = src.size(0), a = src.size(1), b = src.size(2), d = src.size(3);
  const int64_t bytes = d * src.element_size();
  const char* in = static_cast<const char*>(src.data_ptr());
  char* out = static_cast<char*>(dst.data_ptr());
  // Source rows in order: reads are sequential, writes are runs `a` rows apart.
  at::parallel_for(0, n * a * b, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j = r % b, i = (r / b) % a, batch = r / (a * b);
      std::memcpy(out + ((batch * b + j) * a + i) * bytes, in + r * bytes, bytes);
    }
  });
}

// value (N, S, M, D) as a new (N, M, S, D) tensor.
at::Tensor pack_heads(const at::Tensor& value) {
  const auto src = value.contiguous();
  auto dst = at::empty({src.size(0), src.size(2), src.size(1), src.size(3)}, src.options());
  swap_middle(src, dst);
  return dst;
}

// Workers that run_tasks uses for num_tasks tasks.
int64_t num_workers(int64_t num_tasks) {
  return std::max<int64_t>(1, std::min<int64_t>(num_tasks, at::get_num_threads()));
}

// Runs task(i, worker) for i in [0, num_tasks) on num_workers(num_tasks) intra-op threads; worker
// in [0, num_workers) names the thread's own scratch. Threads take the next task from a shared
// counter instead of a fixed share, so one slow or descheduled thread does not hold the others
// back.
template <typename F>
void run_tasks(int64_t num_tasks, const F& task) {
  if (num_tasks <= 0) {
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, num_workers(num_tasks), 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t i = next++; i < num_tasks; i = next++) {
        task(i, worker);
      }
    }
  });
}

// Queries per forward task on dense heads: small enough to balance the threads, large enough that
// the task overhead is negligible.
constexpr int64_t kQueryChunk = 512;

}  // namespace

int64_t cpu_parallel_threads(int64_t num_tasks) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, num_tasks, 1, [&](int64_t /*begin*/, int64_t /*end*/) {
    seen |= uint64_t{1} << std::min(63, at::get_thread_num());
  });
  return __builtin_popcountll(seen.load());
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const char* op_name = "ms_deform_attn_forward";
  check_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            op_name);
  const auto ct = compute_type(value);
  const auto loc = sampling_locations.to(ct).contiguous();
  const auto attn = attention_weights.to(ct).contiguous();
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), nl = loc.size(3), p = loc.size(4);
  auto out = at::empty({n, lq, m * d}, value.options());
  if (out.numel() == 0) {
    return out;
  }
  const auto levels = read_levels(spatial_shapes, level_start_index);
  const bool pack = worth_packing(lq, nl, p, s, m);
  // Dense heads: (N, M, S, D), each head's rows D elements apart.
  const auto v = pack ? pack_heads(value) : value.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        using V = scalar_t;
        using T = at::opmath_type<V>;
        const std::vector<V> zero_row(d, V(0));
        HeadTask<V, T> base{};
        base.zero_row = zero_row.data();
        base.levels = levels.data();
        base.num_levels = nl;
        base.locations = loc.data_ptr<T>();
        base.weights = attn.data_ptr<T>();
        base.output = out.data_ptr<V>();
        base.num_queries = lq;
        base.num_heads = m;
        base.dim = d;
        base.num_points = p;
        const V* vp = v.data_ptr<V>();
        // Two queries' taps per task: the one being summed and the next one.
        const int64_t buffer_size = 2 * 4 * nl * p;
        auto run = [&](const HeadTask<V, T>& t) {
          thread_local std::vector<Tap<V, T>> buffer;
          thread_local std::vector<T> scratch;
          if (static_cast<int64_t>(buffer.size()) < buffer_size) {
            buffer.resize(buffer_size);
          }
          if (static_cast<int64_t>(scratch.size()) < d) {
            scratch.resize(d);
          }
          if (d == 32) {
            run_forward_head<V, T, 32>(t, buffer.data(), scratch.data());
          } else {
            run_forward_head<V, T, 0>(t, buffer.data(), scratch.data());
          }
        };
        if (pack) {
          const int64_t chunks = (lq + kQueryChunk - 1) / kQueryChunk;
          run_tasks(n * m * chunks, [&](int64_t task, int64_t /*worker*/) {
            const int64_t pair = task / chunks, c = task % chunks;
            HeadTask<V, T> t = base;
            t.n = pair / m;
            t.m = pair % m;
            t.head_value = vp + pair * s * d;
            t.row = d;
            t.q_begin = c * kQueryChunk;
            t.q_end = std::min(lq, t.q_begin + kQueryChunk);
            run(t);
          });
        } else {
          // Few samples per row: read the values in place, split over (batch, query); each thread
          // walks its queries head by head.
          at::parallel_for(0, n * lq, 16, [&](int64_t begin, int64_t end) {
            while (begin < end) {
              HeadTask<V, T> t = base;
              t.n = begin / lq;
              t.q_begin = begin % lq;
              t.q_end = std::min(lq, t.q_begin + (end - begin));
              t.row = m * d;
              for (int64_t bm = 0; bm < m; ++bm) {
                t.m = bm;
                t.head_value = vp + t.n * s * m * d + bm * d;
                run(t);
              }
              begin += t.q_end - t.q_begin;
            }
          });
        }
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const char* op_name = "ms_deform_attn_backward";
  check_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            op_name);
  check_ms_deform_attn_grad_output(grad_output, value, sampling_locations, op_name);
  const auto vt = value.scalar_type();
  const auto ct = compute_type(value);
  const auto g = grad_output.contiguous();
  const auto loc = sampling_locations.to(ct).contiguous();
  const auto attn = attention_weights.to(ct).contiguous();
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), nl = loc.size(3), p = loc.size(4);
  const bool pack = worth_packing(lq, nl, p, s, m);
  const auto v = pack ? pack_heads(value) : value.contiguous();
  // Sparse heads sum straight into one zeroed buffer of the arithmetic dtype: grad_value itself,
  // or for 16-bit values a float32 buffer cast to grad_value at the end (one vectorised pass; per
  // head, zeroing and converting all S rows for a few hundred queries cost more than the sums).
  // Dense heads: each worker sums one head at a time into its own dense (S, D) buffer, which it
  // converts into grad_value when the head is done: no full-size buffer, and the head stays in
  // cache.
  const bool direct = !pack;
  auto grad_sums = direct ? at::zeros({n, s, m, d}, value.options().dtype(ct)) : at::Tensor();
  auto grad_value = direct ? grad_sums : at::empty({n, s, m, d}, value.options());
  auto grad_loc = at::empty_like(loc);
  auto grad_attn = at::empty_like(attn);
  if (grad_value.numel() > 0 && lq > 0) {
    const auto levels = read_levels(spatial_shapes, level_start_index);
    const int64_t workers = num_workers(n * m);
    // Per worker: the sink row, then (unless direct) the head's dense sums.
    const int64_t per_worker = d + (direct ? 0 : s * d);
    auto worker_sums = at::empty({workers, per_worker}, value.options().dtype(ct));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vt, "ms_deform_attn_backward", [&] {
      using V = scalar_t;
      using T = at::opmath_type<V>;
      const std::vector<V> zero_row(d, V(0));
      HeadTask<V, T> base{};
      base.zero_row = zero_row.data();
      base.levels = levels.data();
      base.num_levels = nl;
      base.locations = loc.data_ptr<T>();
      base.weights = attn.data_ptr<T>();
      base.grad_output = g.data_ptr<V>();
      base.grad_locations = grad_loc.data_ptr<T>();
      base.grad_weights = grad_attn.data_ptr<T>();
      base.num_rows = s;
      base.num_queries = lq;
      base.num_heads = m;
      base.dim = d;
      base.num_points = p;
      const V* vp = v.data_ptr<V>();
      V* gvp = direct ? nullptr : grad_value.data_ptr<V>();
      T* direct_grad = direct ? grad_sums.data_ptr<T>() : nullptr;
      T* wp = worker_sums.data_ptr<T>();
      // One task per (batch, head): it owns the value gradient of the head and its location and
      // weight gradients.
      run_tasks(n * m, [&](int64_t pair, int64_t worker) {
        HeadTask<V, T> t = base;
        t.n = pair / m;
        t.m = pair % m;
        t.head_value = pack ? vp + pair * s * d : vp + t.n * s * m * d + t.m * d;
        t.row = pack ? d : m * d;
        t.grad_sink = wp + worker * per_worker;
        if (direct) {
          t.head_grad = direct_grad + t.n * s * m * d + t.m * d;
          t.grad_row = m * d;
        } else {
          t.head_grad = t.grad_sink + d;
          t.grad_row = d;
          t.grad_value = gvp;
        }
        std::vector<GradSample<V, T>> buffer(2 * nl * p);
        std::vector<T> scratch(d);
        if (d == 32) {
          run_backward_head<V, T, 32>(t, buffer.data(), scratch.data());
        } else {
          run_backward_head<V, T, 0>(t, buffer.data(), scratch.data());
        }
      });
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
    if (!direct) {
      grad_value.zero_();
    }
  }
  if (direct && vt != ct) {
    grad_value = grad_sums.to(vt);
  }
  return std::make_tuple(grad_value, grad_loc.to(sampling_locations.scalar_type()),
                         grad_attn.to(attention_weights.scalar_type()));
}

}  // namespace deformable_detr
