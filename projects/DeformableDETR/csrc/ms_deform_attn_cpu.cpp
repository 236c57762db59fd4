// CPU kernels of multi-scale deformable attention (float32 and float64; 16-bit inputs are computed
// in float32).
//
// Sampling follows grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): a
// normalised location x in [0, 1] maps to the pixel coordinate x * W - 0.5, and corners outside the
// level contribute zero.
//
// Work is split by (batch, head) pairs. In the backward pass each task owns the gradient of
// value[n, :, m, :] and the location and weight gradients of its head, so no two threads ever
// write the same element and no atomics are needed. When a head takes more samples than it has
// rows, value is first transposed to (N, M, S, D): rows M * D elements apart use only a fraction
// of the cache sets, while a dense head stays in cache. Walking one head, the forward pass
// prefetches what the hardware prefetchers cannot predict: the inputs of queries a few steps
// ahead (num_heads rows apart) and the value rows of the next query, located before the current
// query is summed so that their loads overlap with its arithmetic.
//
// On x86 the per-head loops are compiled three times (baseline, AVX2+FMA, AVX-512) and the widest
// one the CPU supports is picked at run time, so the extension stays portable.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
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

// Everything one (batch n, head m) task needs. Pointers are to the whole contiguous tensors,
// except head_value (row 0 of the head, rows `row` elements apart) and head_grad (a dense (S, D)
// buffer owned by the task, zero on entry).
template <typename T>
struct HeadTask {
  const T* head_value;
  int64_t row;
  const Level* levels;
  int64_t num_levels;
  const T* locations;
  const T* weights;
  T* output;
  const T* grad_output;
  T* head_grad;
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

// Lanes of the partial sums in dot products: separate accumulators per lane let the compiler
// vectorise the reduction without reassociating floating-point additions.
constexpr int kLanes = 16;

// Sum over i of a[i] * b[i] for a channel count known only at run time.
template <typename T>
DDETR_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t dim) {
  T lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      lanes[j] += a[i + j] * b[i + j];
    }
  }
  T sum = 0;
  for (; i < dim; ++i) {
    sum += a[i] * b[i];
  }
  for (int j = 0; j < kLanes; ++j) {
    sum += lanes[j];
  }
  return sum;
}

// A channel row of kDim elements held in kDim / kLen SIMD vectors of kBytes bytes (GCC/Clang
// vector extensions, compiled to the widest registers of the calling function's target). Local
// vectors stay in registers, which an array of scalars behind a pointer does not.
template <typename T, int kDim, int kBytes>
struct Row {
#if defined(__GNUC__)
  typedef T Vec __attribute__((vector_size(kBytes)));
  static constexpr int kLen = kBytes / static_cast<int>(sizeof(T));
#else
  typedef T Vec;
  static constexpr int kLen = 1;
#endif
  static constexpr int kCount = kDim / kLen;
  static_assert(kDim % kLen == 0, "the channel count must be a multiple of the vector length");
  Vec v[kCount];

  DDETR_INLINE static Vec load(const T* p) {
    Vec x;
    std::memcpy(&x, p, sizeof(Vec));
    return x;
  }
  DDETR_INLINE static void store(T* p, const Vec& x) { std::memcpy(p, &x, sizeof(Vec)); }
  DDETR_INLINE static T sum(const Vec& x) {
    T s = 0;
    for (int i = 0; i < kLen; ++i) {
      s += x[i];
    }
    return s;
  }
  DDETR_INLINE void zero() {
    for (int j = 0; j < kCount; ++j) {
      v[j] = Vec{} * 0;
    }
  }
  DDETR_INLINE void load_from(const T* p) {
    for (int j = 0; j < kCount; ++j) {
      v[j] = load(p + j * kLen);
    }
  }
  DDETR_INLINE void store_to(T* p) const {
    for (int j = 0; j < kCount; ++j) {
      store(p + j * kLen, v[j]);
    }
  }
  // this += w * p[0:kDim]
  DDETR_INLINE void add_scaled(T w, const T* p) {
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
  DDETR_INLINE T dot(const T* p) const {
    Vec acc = v[0] * load(p);
    for (int j = 1; j < kCount; ++j) {
      acc += v[j] * load(p + j * kLen);
    }
    return sum(acc);
  }
};

// One value row of a forward sample: its offset in the head's values and its weight (attention
// weight times bilinear weight).
template <typename T>
struct Tap {
  int64_t offset;
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
// prefetches them; returns how many there are.
template <typename T>
DDETR_INLINE int64_t gather_taps(const HeadTask<T>& t, int64_t q, int64_t width, Tap<T>* taps) {
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
        if (c.valid[k]) {
          const int64_t offset = c.index[k] * t.row;
          taps[count++] = {offset, a * c.weight[k]};
          prefetch_bytes(t.head_value + offset, width * static_cast<int64_t>(sizeof(T)), false);
        }
      }
    }
  }
  return count;
}

// Forward pass of one head for the queries [q_begin, q_end). kDim > 0 fixes the channel count at
// compile time (vector registers of kBytes bytes); kDim == 0 reads it from the task. The rows of
// query q + 1 are located and prefetched before query q is summed, so their loads overlap.
template <typename T, int kDim, int kBytes>
DDETR_INLINE void forward_head(const HeadTask<T>& t, Tap<T>* buffer) {
  const int64_t dim = kDim > 0 ? kDim : t.dim;
  const int64_t samples = t.num_levels * t.num_points;
  const T* __restrict head_value = t.head_value;
  Tap<T>* cur = buffer;
  Tap<T>* next = buffer + 4 * samples;
  int64_t cur_count = t.q_begin < t.q_end ? gather_taps(t, t.q_begin, dim, cur) : 0;
  for (int64_t q = t.q_begin; q < t.q_end; ++q) {
    const int64_t pair = (t.n * t.num_queries + q) * t.num_heads + t.m;
    T* __restrict out = t.output + pair * dim;
    if (q + 1 + kPrefetchQueries < t.q_end) {
      const int64_t ahead = pair + t.num_heads * (1 + kPrefetchQueries);
      prefetch_bytes(t.locations + 2 * ahead * samples, 2 * samples * sizeof(T), false);
      prefetch_bytes(t.weights + ahead * samples, samples * sizeof(T), false);
      prefetch_bytes(t.output + ahead * dim, dim * sizeof(T), true);
    }
    const int64_t next_count = q + 1 < t.q_end ? gather_taps(t, q + 1, dim, next) : 0;
    if constexpr (kDim > 0) {
      Row<T, kDim, kBytes> acc;
      acc.zero();
      for (int64_t e = 0; e < cur_count; ++e) {
        acc.add_scaled(cur[e].weight, head_value + cur[e].offset);
      }
      acc.store_to(out);
    } else {
      std::fill(out, out + dim, T(0));
      for (int64_t e = 0; e < cur_count; ++e) {
        const T w = cur[e].weight;
        const T* __restrict v = head_value + cur[e].offset;
        for (int64_t i = 0; i < dim; ++i) {
          out[i] += w * v[i];
        }
      }
    }
    std::swap(cur, next);
    cur_count = next_count;
  }
}

// Backward pass of one head over all queries: accumulates into the task's dense head_grad and
// writes the location and weight gradients of the head.
template <typename T, int kDim, int kBytes>
DDETR_INLINE void backward_head(const HeadTask<T>& t) {
  const int64_t dim = kDim > 0 ? kDim : t.dim;
  const int64_t samples = t.num_levels * t.num_points;
  const T* __restrict head_value = t.head_value;
  T* __restrict head_grad = t.head_grad;
  for (int64_t q = 0; q < t.num_queries; ++q) {
    const int64_t pair = (t.n * t.num_queries + q) * t.num_heads + t.m;
    const T* __restrict g = t.grad_output + pair * dim;
    Row<T, (kDim > 0 ? kDim : kBytes / sizeof(T)), kBytes> g_row;
    if constexpr (kDim > 0) {
      g_row.load_from(g);
    }
    const T* loc = t.locations + 2 * pair * samples;
    const T* attn = t.weights + pair * samples;
    T* grad_loc = t.grad_locations + 2 * pair * samples;
    T* grad_attn = t.grad_weights + pair * samples;
    for (int64_t l = 0; l < t.num_levels; ++l) {
      const Level& level = t.levels[l];
      for (int64_t p = 0; p < t.num_points; ++p, loc += 2, ++attn, grad_loc += 2, ++grad_attn) {
        Corners<T> c;
        if (!bilinear_corners(loc[0], loc[1], level, c)) {
          grad_loc[0] = 0;
          grad_loc[1] = 0;
          *grad_attn = 0;
          continue;
        }
        const T a = *attn;
        // g . v for every corner; the three gradients are linear combinations of these.
        T dots[4];
        for (int k = 0; k < 4; ++k) {
          dots[k] = 0;
          if (c.valid[k]) {
            const T* v = head_value + c.index[k] * t.row;
            T* gv = head_grad + c.index[k] * dim;
            const T w = a * c.weight[k];
            if constexpr (kDim > 0) {
              dots[k] = g_row.dot(v);
              g_row.add_scaled_to(w, gv);
            } else {
              dots[k] = dot<T>(g, v, dim);
              for (int64_t i = 0; i < dim; ++i) {
                gv[i] += w * g[i];
              }
            }
          }
        }
        const T hh = 1 - c.lh, hw = 1 - c.lw;
        *grad_attn = c.weight[0] * dots[0] + c.weight[1] * dots[1] + c.weight[2] * dots[2] +
                     c.weight[3] * dots[3];
        // The chain rule through pixel = location * size - 0.5 multiplies by the level size.
        const T dw = hh * (dots[1] - dots[0]) + c.lh * (dots[3] - dots[2]);
        const T dh = hw * (dots[2] - dots[0]) + c.lw * (dots[3] - dots[1]);
        grad_loc[0] = a * dw * static_cast<T>(level.width);
        grad_loc[1] = a * dh * static_cast<T>(level.height);
      }
    }
  }
}

template <typename T, int kDim>
void forward_head_baseline(const HeadTask<T>& t, Tap<T>* buffer) {
  forward_head<T, kDim, 16>(t, buffer);
}

template <typename T, int kDim>
void backward_head_baseline(const HeadTask<T>& t) {
  backward_head<T, kDim, 16>(t);
}

#ifdef DDETR_X86_MULTIVERSION
template <typename T, int kDim>
__attribute__((target("avx2,fma"))) void forward_head_avx2(const HeadTask<T>& t, Tap<T>* buffer) {
  forward_head<T, kDim, 32>(t, buffer);
}

template <typename T, int kDim>
__attribute__((target("avx2,fma"))) void backward_head_avx2(const HeadTask<T>& t) {
  backward_head<T, kDim, 32>(t);
}

template <typename T, int kDim>
__attribute__((target("avx512f,avx512vl,avx2,fma"))) void forward_head_avx512(const HeadTask<T>& t,
                                                                              Tap<T>* buffer) {
  forward_head<T, kDim, 64>(t, buffer);
}

template <typename T, int kDim>
__attribute__((target("avx512f,avx512vl,avx2,fma"))) void backward_head_avx512(
    const HeadTask<T>& t) {
  backward_head<T, kDim, 64>(t);
}
#endif

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa cpu_isa() {
#ifdef DDETR_X86_MULTIVERSION
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Isa::kAvx2;
    }
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

template <typename T, int kDim>
void run_forward_head(const HeadTask<T>& t, Tap<T>* buffer) {
#ifdef DDETR_X86_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return forward_head_avx512<T, kDim>(t, buffer);
    case Isa::kAvx2:
      return forward_head_avx2<T, kDim>(t, buffer);
    default:
      break;
  }
#endif
  forward_head_baseline<T, kDim>(t, buffer);
}

template <typename T, int kDim>
void run_backward_head(const HeadTask<T>& t) {
#ifdef DDETR_X86_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return backward_head_avx512<T, kDim>(t);
    case Isa::kAvx2:
      return backward_head_avx2<T, kDim>(t);
    default:
      break;
  }
#endif
  backward_head_baseline<T, kDim>(t);
}

at::ScalarType compute_type(const at::Tensor& value) {
  const auto t = value.scalar_type();
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
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

// Copies value (N, S, M, D) into a new (N, M, S, D) tensor. Each thread reads a block of whole
// token rows and writes M short runs, which is cheaper than the generic strided copy.
at::Tensor pack_heads(const at::Tensor& value) {
  const auto src = value.contiguous();
  const int64_t n = src.size(0), s = src.size(1), m = src.size(2), d = src.size(3);
  auto dst = at::empty({n, m, s, d}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "ms_deform_attn_pack_heads", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    at::parallel_for(0, n * s, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / s, token = row % s;
        for (int64_t h = 0; h < m; ++h) {
          std::memcpy(out + ((b * m + h) * s + token) * d, in + (row * m + h) * d,
                      d * sizeof(scalar_t));
        }
      }
    });
  });
  return dst;
}

// Runs task(i) for i in [0, num_tasks) on the intra-op threads. Threads take the next task from a
// shared counter instead of a fixed share, so one slow or descheduled thread does not hold the
// others back.
template <typename F>
void run_tasks(int64_t num_tasks, const F& task) {
  if (num_tasks <= 0) {
    return;
  }
  const int64_t workers = std::min<int64_t>(num_tasks, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = next++; i < num_tasks; i = next++) {
      task(i);
    }
  });
}

// Queries per forward task on dense heads: small enough to balance the threads, large enough that
// the task overhead is negligible.
constexpr int64_t kQueryChunk = 512;

}  // namespace

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
  auto out = at::empty({n, lq, m * d}, value.options().dtype(ct));
  if (out.numel() == 0) {
    return out.to(value.scalar_type());
  }
  const auto levels = read_levels(spatial_shapes, level_start_index);
  const bool pack = worth_packing(lq, nl, p, s, m);
  // Dense heads: (N, M, S, D), each head's rows D elements apart.
  const auto v = pack ? pack_heads(value.to(ct)) : value.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "ms_deform_attn_forward_cpu", [&] {
    using T = scalar_t;
    HeadTask<T> base{};
    base.levels = levels.data();
    base.num_levels = nl;
    base.locations = loc.data_ptr<T>();
    base.weights = attn.data_ptr<T>();
    base.output = out.data_ptr<T>();
    base.num_queries = lq;
    base.num_heads = m;
    base.dim = d;
    base.num_points = p;
    const T* vp = v.data_ptr<T>();
    // Two queries' taps per task: the one being summed and the next one.
    const int64_t buffer_size = 2 * 4 * nl * p;
    auto run = [&](const HeadTask<T>& t) {
      thread_local std::vector<Tap<T>> buffer;
      if (static_cast<int64_t>(buffer.size()) < buffer_size) {
        buffer.resize(buffer_size);
      }
      if (d == 32) {
        run_forward_head<T, 32>(t, buffer.data());
      } else {
        run_forward_head<T, 0>(t, buffer.data());
      }
    };
    if (pack) {
      const int64_t chunks = (lq + kQueryChunk - 1) / kQueryChunk;
      run_tasks(n * m * chunks, [&](int64_t task) {
        const int64_t pair = task / chunks, c = task % chunks;
        HeadTask<T> t = base;
        t.n = pair / m;
        t.m = pair % m;
        t.head_value = vp + pair * s * d;
        t.row = d;
        t.q_begin = c * kQueryChunk;
        t.q_end = std::min(lq, t.q_begin + kQueryChunk);
        run(t);
      });
    } else {
      // Few samples per row: read the values in place, split over (batch, query).
      at::parallel_for(0, n * lq, 16, [&](int64_t begin, int64_t end) {
        for (int64_t nq = begin; nq < end; ++nq) {
          HeadTask<T> t = base;
          t.n = nq / lq;
          t.q_begin = nq % lq;
          t.q_end = t.q_begin + 1;
          t.row = m * d;
          for (int64_t bm = 0; bm < m; ++bm) {
            t.m = bm;
            t.head_value = vp + t.n * s * m * d + bm * d;
            run(t);
          }
        }
      });
    }
  });
  return out.to(value.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const char* op_name = "ms_deform_attn_backward";
  check_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            op_name);
  check_ms_deform_attn_grad_output(grad_output, value, sampling_locations, op_name);
  const auto ct = compute_type(value);
  const auto g = grad_output.to(ct).contiguous();
  const auto loc = sampling_locations.to(ct).contiguous();
  const auto attn = attention_weights.to(ct).contiguous();
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), nl = loc.size(3), p = loc.size(4);
  const bool pack = worth_packing(lq, nl, p, s, m);
  const auto v = pack ? value.to(ct).permute({0, 2, 1, 3}).contiguous() : value.to(ct).contiguous();
  // The value gradient is accumulated per head in (N, M, S, D) layout: task (n, m) owns the dense
  // slab [n, m], so no two threads ever write the same element.
  auto grad_heads = at::zeros({n, m, s, d}, value.options().dtype(ct));
  auto grad_loc = at::empty_like(loc);
  auto grad_attn = at::empty_like(attn);
  if (grad_heads.numel() > 0) {
    const auto levels = read_levels(spatial_shapes, level_start_index);
    AT_DISPATCH_FLOATING_TYPES(ct, "ms_deform_attn_backward_cpu", [&] {
      using T = scalar_t;
      HeadTask<T> base{};
      base.levels = levels.data();
      base.num_levels = nl;
      base.locations = loc.data_ptr<T>();
      base.weights = attn.data_ptr<T>();
      base.grad_output = g.data_ptr<T>();
      base.grad_locations = grad_loc.data_ptr<T>();
      base.grad_weights = grad_attn.data_ptr<T>();
      base.num_queries = lq;
      base.num_heads = m;
      base.dim = d;
      base.num_points = p;
      const T* vp = v.data_ptr<T>();
      T* gp = grad_heads.data_ptr<T>();
      // One task per (batch, head): it also owns the location and weight gradients of head m.
      run_tasks(n * m, [&](int64_t pair) {
        HeadTask<T> t = base;
        t.n = pair / m;
        t.m = pair % m;
        if (pack) {
          t.head_value = vp + pair * s * d;
          t.row = d;
        } else {
          t.head_value = vp + t.n * s * m * d + t.m * d;
          t.row = m * d;
        }
        t.head_grad = gp + pair * s * d;
        if (d == 32) {
          run_backward_head<T, 32>(t);
        } else {
          run_backward_head<T, 0>(t);
        }
      });
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  auto grad_value = grad_heads.permute({0, 2, 1, 3}).to(value.scalar_type()).contiguous();
  return std::make_tuple(grad_value, grad_loc.to(sampling_locations.scalar_type()),
                         grad_attn.to(attention_weights.scalar_type()));
}

}  // namespace deformable_detr
