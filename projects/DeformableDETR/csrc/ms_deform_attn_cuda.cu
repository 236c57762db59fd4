// CUDA kernels of multi-scale deformable attention: float32, float16 and bfloat16 values, with
// sampling locations and attention weights either in the value's dtype or in float32 (the mix that
// autocast produces). Sums are accumulated in float32.
//
// Sampling follows grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False), as in
// the CPU kernels. The forward pass runs one thread per output element (batch, query, head,
// channel), so neighbouring threads read neighbouring channels of a value row. The backward pass
// runs one thread per sample (batch, query, head, level, point): it owns that sample's location and
// weight gradients and adds its share of the value gradient atomically into a float32 buffer.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "ms_deform_attn.h"

namespace deformable_detr {

namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t work) {
  // Kernels loop with a grid stride, so the grid may be smaller than the work.
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65535 * 32));
}

// Bilinear corners of one sample; returns false when it falls entirely outside the level.
struct Corners {
  int64_t index[4];
  float weight[4];
  bool valid[4];
  float lh, lw;
};

__device__ __forceinline__ bool bilinear_corners(float x, float y, int64_t height, int64_t width,
                                                 int64_t start, Corners& c) {
  const float h_im = y * static_cast<float>(height) - 0.5f;
  const float w_im = x * static_cast<float>(width) - 0.5f;
  if (!(h_im > -1.f && w_im > -1.f && h_im < static_cast<float>(height) &&
        w_im < static_cast<float>(width))) {
    return false;
  }
  const float h_floor = floorf(h_im), w_floor = floorf(w_im);
  const int64_t h_low = static_cast<int64_t>(h_floor), w_low = static_cast<int64_t>(w_floor);
  c.lh = h_im - h_floor;
  c.lw = w_im - w_floor;
  const float hh = 1.f - c.lh, hw = 1.f - c.lw;
  const bool top = h_low >= 0, bottom = h_low + 1 < height;
  const bool left = w_low >= 0, right = w_low + 1 < width;
  c.valid[0] = top && left;
  c.valid[1] = top && right;
  c.valid[2] = bottom && left;
  c.valid[3] = bottom && right;
  c.weight[0] = hh * hw;
  c.weight[1] = hh * c.lw;
  c.weight[2] = c.lh * hw;
  c.weight[3] = c.lh * c.lw;
  const int64_t base = start + h_low * width + w_low;
  c.index[0] = base;
  c.index[1] = base + 1;
  c.index[2] = base + width;
  c.index[3] = base + width + 1;
  return true;
}

template <typename scalar_t, typename loc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ spatial_shapes,
                               const int64_t* __restrict__ level_start_index,
                               const loc_t* __restrict__ locations,
                               const loc_t* __restrict__ weights, scalar_t* __restrict__ output,
                               int64_t total, int64_t num_rows, int64_t num_queries,
                               int64_t num_heads, int64_t dim, int64_t num_levels,
                               int64_t num_points) {
  const int64_t row = num_heads * dim;
  const int64_t samples = num_levels * num_points;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t d = idx % dim;
    const int64_t pair = idx / dim;  // (n * Lq + q) * M + m
    const int64_t m = pair % num_heads;
    const int64_t n = pair / (num_heads * num_queries);
    const scalar_t* head_value = value + n * num_rows * row + m * dim + d;
    const loc_t* loc = locations + 2 * pair * samples;
    const loc_t* attn = weights + pair * samples;
    float acc = 0.f;
    for (int64_t l = 0; l < num_levels; ++l) {
      const int64_t height = spatial_shapes[2 * l], width = spatial_shapes[2 * l + 1];
      const int64_t start = level_start_index[l];
      for (int64_t p = 0; p < num_points; ++p, loc += 2, ++attn) {
        Corners c;
        if (!bilinear_corners(static_cast<float>(loc[0]), static_cast<float>(loc[1]), height, width,
                              start, c)) {
          continue;
        }
        const float a = static_cast<float>(*attn);
        float sampled = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c.valid[k]) {
            sampled += c.weight[k] * static_cast<float>(head_value[c.index[k] * row]);
          }
        }
        acc += a * sampled;
      }
    }
    output[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename loc_t>
__global__ void backward_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
    const loc_t* __restrict__ locations, const loc_t* __restrict__ weights,
    float* __restrict__ grad_value, loc_t* __restrict__ grad_locations,
    loc_t* __restrict__ grad_weights, int64_t total, int64_t num_rows, int64_t num_queries,
    int64_t num_heads, int64_t dim, int64_t num_levels, int64_t num_points) {
  const int64_t row = num_heads * dim;
  const int64_t samples = num_levels * num_points;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t pair = idx / samples;  // (n * Lq + q) * M + m
    const int64_t l = (idx % samples) / num_points;
    const int64_t m = pair % num_heads;
    const int64_t n = pair / (num_heads * num_queries);
    const int64_t height = spatial_shapes[2 * l], width = spatial_shapes[2 * l + 1];
    Corners c;
    if (!bilinear_corners(static_cast<float>(locations[2 * idx]),
                          static_cast<float>(locations[2 * idx + 1]), height, width,
                          level_start_index[l], c)) {
      grad_locations[2 * idx] = static_cast<loc_t>(0.f);
      grad_locations[2 * idx + 1] = static_cast<loc_t>(0.f);
      grad_weights[idx] = static_cast<loc_t>(0.f);
      continue;
    }
    const float a = static_cast<float>(weights[idx]);
    const scalar_t* g = grad_output + pair * dim;
    const int64_t head_offset = n * num_rows * row + m * dim;
    float dots[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      dots[k] = 0.f;
      if (c.valid[k]) {
        const scalar_t* v = value + head_offset + c.index[k] * row;
        float* gv = grad_value + head_offset + c.index[k] * row;
        const float w = a * c.weight[k];
        float sum = 0.f;
        for (int64_t i = 0; i < dim; ++i) {
          const float gi = static_cast<float>(g[i]);
          sum += gi * static_cast<float>(v[i]);
          atomicAdd(gv + i, w * gi);
        }
        dots[k] = sum;
      }
    }
    const float hh = 1.f - c.lh, hw = 1.f - c.lw;
    grad_weights[idx] = static_cast<loc_t>(c.weight[0] * dots[0] + c.weight[1] * dots[1] +
                                           c.weight[2] * dots[2] + c.weight[3] * dots[3]);
    const float dw = hh * (dots[1] - dots[0]) + c.lh * (dots[3] - dots[2]);
    const float dh = hw * (dots[2] - dots[0]) + c.lw * (dots[3] - dots[1]);
    grad_locations[2 * idx] = static_cast<loc_t>(a * dw * static_cast<float>(width));
    grad_locations[2 * idx + 1] = static_cast<loc_t>(a * dh * static_cast<float>(height));
  }
}

// Raises right after a failed launch, which would otherwise be reported by whichever CUDA call
// comes next, far from its cause. "No kernel image is available" means that this build has no code
// for the GPU present: the message says which architecture to rebuild for.
void check_launch(const char* kernel, const at::Tensor& value, const char* op_name) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) {
    return;
  }
  // Only for the message: when even this query fails, the launch error is still the one raised.
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, c10::cuda::current_device()) != cudaSuccess) {
    cudaGetLastError();
  }
  TORCH_CHECK(err != cudaErrorNoKernelImageForDevice, op_name, ": ", kernel, " (",
              value.scalar_type(), ") has no code for this GPU (", prop.name,
              ", compute capability ", prop.major, ".", prop.minor,
              "): rebuild deformable_detr._C for it, e.g. FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=\"",
              prop.major, ".", prop.minor, "\" pip install -e .");
  TORCH_CHECK(false, op_name, ": launch of ", kernel, " (", value.scalar_type(), ") on ", prop.name,
              " failed: ", cudaGetErrorString(err));
}

void check_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                const at::Tensor& attention_weights, const char* op_name) {
  check_ms_deform_attn_metadata(value, spatial_shapes, level_start_index, sampling_locations,
                                attention_weights, op_name);
  TORCH_CHECK(value.is_cuda(), op_name, ": expected CUDA tensors, got ", value.device());
  TORCH_CHECK(value.scalar_type() != at::kDouble, op_name,
              ": float64 is not supported on CUDA; use float32, float16 or bfloat16");
  // The level sizes decide which memory the kernels read, so they are checked on the host: a
  // copy of L * 3 integers.
  check_ms_deform_attn_levels(spatial_shapes.cpu(), level_start_index.cpu(), value.size(1),
                              op_name);
}

// Calls f.template operator()<scalar_t, loc_t>() for the dtypes of value and sampling_locations.
template <typename F>
void dispatch_types(const at::Tensor& value, const at::Tensor& locations, const char* op_name,
                    F&& f) {
  const bool float_locations = locations.scalar_type() == at::kFloat;
  switch (value.scalar_type()) {
    case at::kFloat:
      f.template operator()<float, float>();
      break;
    case at::kHalf:
      if (float_locations) {
        f.template operator()<at::Half, float>();
      } else {
        f.template operator()<at::Half, at::Half>();
      }
      break;
    case at::kBFloat16:
      if (float_locations) {
        f.template operator()<at::BFloat16, float>();
      } else {
        f.template operator()<at::BFloat16, at::BFloat16>();
      }
      break;
    default:
      TORCH_CHECK(false, op_name, ": unsupported dtype ", value.scalar_type(), " on CUDA");
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const char* op_name = "ms_deform_attn_forward";
  check_cuda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
             op_name);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto v = value.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  const int64_t n = v.size(0), s = v.size(1), m = v.size(2), d = v.size(3);
  const int64_t lq = loc.size(1), nl = loc.size(3), p = loc.size(4);
  auto out = at::empty({n, lq, m * d}, v.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(v, loc, op_name, [&]<typename scalar_t, typename loc_t>() {
    forward_kernel<scalar_t, loc_t><<<num_blocks(total), kThreads, 0, stream>>>(
        v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
        loc.data_ptr<loc_t>(), attn.data_ptr<loc_t>(), out.data_ptr<scalar_t>(), total, s, lq, m, d,
        nl, p);
    check_launch("forward_kernel", v, op_name);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const char* op_name = "ms_deform_attn_backward";
  check_cuda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
             op_name);
  check_ms_deform_attn_grad_output(grad_output, value, sampling_locations, op_name);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto g = grad_output.contiguous();
  const auto v = value.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  const int64_t n = v.size(0), s = v.size(1), m = v.size(2), d = v.size(3);
  const int64_t lq = loc.size(1), nl = loc.size(3), p = loc.size(4);
  // Atomic sums go to a float32 buffer: 16-bit atomics would round at every addition.
  auto grad_value = at::zeros(v.sizes(), v.options().dtype(at::kFloat));
  auto grad_loc = at::empty_like(loc);
  auto grad_attn = at::empty_like(attn);
  const int64_t total = attn.numel();
  if (total > 0 && d > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_types(v, loc, op_name, [&]<typename scalar_t, typename loc_t>() {
      backward_kernel<scalar_t, loc_t><<<num_blocks(total), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
          starts.data_ptr<int64_t>(), loc.data_ptr<loc_t>(), attn.data_ptr<loc_t>(),
          grad_value.data_ptr<float>(), grad_loc.data_ptr<loc_t>(), grad_attn.data_ptr<loc_t>(),
          total, s, lq, m, d, nl, p);
      check_launch("backward_kernel", v, op_name);
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  return std::make_tuple(grad_value.to(value.scalar_type()), grad_loc, grad_attn);
}

}  // namespace deformable_detr
