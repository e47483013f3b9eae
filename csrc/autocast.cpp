// Autocast for the apply op, as ATen does for linear: under torch.autocast, x, weight, bias and the adapters are
// cast to the autocast dtype of the device (bfloat16 on the CPU by default; float16 or bfloat16 on CUDA) and the op
// runs in it. float64 stays as it is, again as for linear.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace d9d {
namespace {

template <c10::DeviceType device>
at::Tensor lora_forward_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout,
                                 const at::Tensor& seed) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("d9d::lora_forward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               const at::Tensor&, const at::Tensor&, double, double,
                                               const at::Tensor&)>();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return op.call(at::autocast::cached_cast(dtype, x, device), at::autocast::cached_cast(dtype, weight, device),
                 at::autocast::cached_cast(dtype, bias, device), at::autocast::cached_cast(dtype, lora_A, device),
                 at::autocast::cached_cast(dtype, lora_B, device), scale, dropout, seed);
}

}  // namespace
}  // namespace d9d

TORCH_LIBRARY_IMPL(d9d, AutocastCPU, m) {
  m.impl("lora_forward", &d9d::lora_forward_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(d9d, AutocastCUDA, m) {
  m.impl("lora_forward", &d9d::lora_forward_autocast<c10::DeviceType::CUDA>);
}
