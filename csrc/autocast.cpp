// Autocast for the apply op, as ATen does for linear: under torch.autocast, x, weight and bias are cast to the
// autocast dtype of the device (bfloat16 on the CPU by default; float16 or bfloat16 on CUDA) and the op runs in it.
// float64 stays as it is, again as for linear. float32 adapters are passed as they are (the op takes them on 16-bit
// x); adapters of other dtypes are cast like the rest.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

#include "lora.h"

namespace d9d {
namespace {

template <c10::DeviceType device>
at::Tensor lora_forward_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout,
                                 const at::Tensor& seed) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("d9d::lora_forward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               const at::Tensor&, const at::Tensor&, double, double,
                                               const at::Tensor&)>();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  const at::Tensor x_cast = at::autocast::cached_cast(dtype, x, device);
  // A float32 pair of adapters stays float32 on 16-bit x (the op takes it): the op rounds them for its products and
  // returns their gradients in float32, which a cast here would round to 16 bits first.
  const bool keep = lora_B.scalar_type() == lora_A.scalar_type() &&
                    float32_adapters_on(lora_A.scalar_type(), x_cast.scalar_type());
  const auto adapter = [&](const at::Tensor& t) { return keep ? t : at::autocast::cached_cast(dtype, t, device); };
  return op.call(x_cast, at::autocast::cached_cast(dtype, weight, device),
                 at::autocast::cached_cast(dtype, bias, device), adapter(lora_A), adapter(lora_B), scale, dropout,
                 seed);
}

}  // namespace
}  // namespace d9d

TORCH_LIBRARY_IMPL(d9d, AutocastCPU, m) {
  m.impl("lora_forward", &d9d::lora_forward_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(d9d, AutocastCUDA, m) {
  m.impl("lora_forward", &d9d::lora_forward_autocast<c10::DeviceType::CUDA>);
}
