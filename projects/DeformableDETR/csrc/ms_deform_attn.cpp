// Registers the multi-scale deformable attention operators under torch.ops.deformable_detr and
// holds the input checks shared by the CPU and CUDA kernels. Autograd and the fake (meta) kernels
// are registered from Python in deformable_detr/layers/ms_deform_attn_func.py.
#include "ms_deform_attn.h"

#include <Python.h>
#include <torch/library.h>

namespace deformable_detr {

void check_ms_deform_attn_metadata(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index,
                                   const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_weights, const char* op_name) {
  TORCH_CHECK(value.dim() == 4, op_name, ": value must have shape (N, S, M, D), got ",
              value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op_name,
              ": spatial_shapes must have shape (L, 2), got ", spatial_shapes.sizes());
  const int64_t num_levels = spatial_shapes.size(0);
  TORCH_CHECK(num_levels >= 1, op_name, ": spatial_shapes must describe at least one level");
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels, op_name,
              ": level_start_index must have shape (L,) = (", num_levels, ",), got ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6, op_name,
              ": sampling_locations must have shape (N, Lq, M, L, P, 2), got ",
              sampling_locations.sizes());
  const auto n = value.size(0), m = value.size(2);
  const auto loc = sampling_locations.sizes();
  TORCH_CHECK(loc[0] == n && loc[2] == m && loc[3] == num_levels && loc[5] == 2, op_name,
              ": sampling_locations must have shape (N, Lq, M, L, P, 2) = (", n, ", Lq, ", m, ", ",
              num_levels, ", P, 2), got ", loc);
  TORCH_CHECK(attention_weights.dim() == 5 && attention_weights.sizes() == loc.slice(0, 5), op_name,
              ": attention_weights must have shape (N, Lq, M, L, P) = ", loc.slice(0, 5), ", got ",
              attention_weights.sizes());

  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, op_name,
              ": spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, op_name,
              ": level_start_index must be int64, got ", level_start_index.scalar_type());
  const auto vt = value.scalar_type(), lt = sampling_locations.scalar_type();
  TORCH_CHECK(at::isFloatingType(vt), op_name, ": value must be a floating-point tensor, got ", vt);
  TORCH_CHECK(attention_weights.scalar_type() == lt, op_name,
              ": sampling_locations and attention_weights must have the same dtype, got ", lt,
              " and ", attention_weights.scalar_type());
  const bool half_value = vt == at::kHalf || vt == at::kBFloat16;
  TORCH_CHECK(lt == vt || (half_value && lt == at::kFloat), op_name,
              ": sampling_locations and attention_weights must have the dtype of value (", vt, ")",
              half_value ? " or float32" : "", ", got ", lt);

  const auto device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device && level_start_index.device() == device &&
                  sampling_locations.device() == device && attention_weights.device() == device,
              op_name, ": all inputs must be on the device of value (", device,
              "), got spatial_shapes on ", spatial_shapes.device(), ", level_start_index on ",
              level_start_index.device(), ", sampling_locations on ", sampling_locations.device(),
              ", attention_weights on ", attention_weights.device());
}

void check_ms_deform_attn_levels(const at::Tensor& spatial_shapes_cpu,
                                 const at::Tensor& level_start_index_cpu, int64_t num_rows,
                                 const char* op_name) {
  const auto shapes = spatial_shapes_cpu.contiguous();
  const auto starts = level_start_index_cpu.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    const int64_t h = hw[2 * l], w = hw[2 * l + 1];
    // The bound keeps h * w and the running sum far from overflow.
    TORCH_CHECK(h > 0 && w > 0 && h < (int64_t{1} << 31) && w < (int64_t{1} << 31), op_name,
                ": spatial_shapes[", l, "] = (", h, ", ", w, ") must be positive sizes");
    TORCH_CHECK(start[l] == total, op_name, ": level_start_index[", l, "] = ", start[l],
                " but the levels before it hold ", total,
                " rows (level_start_index must be the exclusive cumulative sum of H * W)");
    total += h * w;
    TORCH_CHECK(total <= num_rows, op_name, ": value has S = ", num_rows,
                " rows but spatial_shapes describe at least sum(H * W) = ", total);
  }
  TORCH_CHECK(total == num_rows, op_name, ": value has S = ", num_rows,
              " rows but spatial_shapes describe sum(H * W) = ", total);
}

void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                      const at::Tensor& sampling_locations, const char* op_name) {
  const auto n = value.size(0), m = value.size(2), d = value.size(3);
  const auto lq = sampling_locations.size(1);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == n && grad_output.size(1) == lq &&
                  grad_output.size(2) == m * d,
              op_name, ": grad_output must have shape (N, Lq, M * D) = (", n, ", ", lq, ", ", m * d,
              "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), op_name,
              ": grad_output must have the dtype of value (", value.scalar_type(), "), got ",
              grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == value.device(), op_name,
              ": grad_output must be on the device of value (", value.device(), "), got ",
              grad_output.device());
}

TORCH_LIBRARY(deformable_detr, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
  // A diagnostic, not part of the op: the threads the CPU kernels' parallel loops really use.
  m.def("_cpu_parallel_threads(int num_tasks) -> int", &cpu_parallel_threads);
}

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(deformable_detr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward);
}
#endif

}  // namespace deformable_detr

// An empty Python module: importing deformable_detr._C loads this library, whose static
// initialisers register the operators above with the dispatcher.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
