// Multi-scale deformable attention: declarations of the CPU and CUDA kernels and the functions that
// pick one of them from the device of the inputs. The operators registered in ms_deform_attn.cpp
// call these dispatchers.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace deformable_detr {

// Checks ranks, matching sizes, dtypes and devices of the inputs (no data is read).
void check_ms_deform_attn_metadata(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index,
                                   const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_weights, const char* op_name);

// Checks that spatial_shapes and level_start_index (host copies) describe the num_rows rows of
// value exactly: positive sizes, level l starting where level l - 1 ends, sum of H * W == S.
void check_ms_deform_attn_levels(const at::Tensor& spatial_shapes_cpu,
                                 const at::Tensor& level_start_index_cpu, int64_t num_rows,
                                 const char* op_name);

// Checks grad_output against the forward output's shape, dtype and device.
void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                      const at::Tensor& sampling_locations, const char* op_name);

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// How many distinct intra-op threads one at::parallel_for of the CPU kernels runs num_tasks
// tasks on: at::get_num_threads() capped by num_tasks when the library was built with the
// parallel backend of PyTorch (OpenMP needs -fopenmp), 1 when its loops compiled serial.
int64_t cpu_parallel_threads(int64_t num_tasks);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);
#endif

inline at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                         const at::Tensor& level_start_index,
                                         const at::Tensor& sampling_locations,
                                         const at::Tensor& attention_weights) {
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_forward_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights);
#else
    TORCH_CHECK(false, "ms_deform_attn_forward: deformable_detr._C was built without CUDA support");
#endif
  }
  return ms_deform_attn_forward_cpu(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_backward_cuda(grad_output, value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights);
#else
    TORCH_CHECK(false,
                "ms_deform_attn_backward: deformable_detr._C was built without CUDA support");
#endif
  }
  return ms_deform_attn_backward_cpu(grad_output, value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights);
}

}  // namespace deformable_detr
