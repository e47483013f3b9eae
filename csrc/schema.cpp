// The op schemas of the d9d namespace, declared once; kernels register per device in cpu/ and cuda/, the
// merge op once for all devices (lora_merge.cpp), autocast in autocast.cpp.
#include <torch/library.h>

TORCH_LIBRARY(d9d, m) {
  m.def(
      "lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
      "float dropout, Tensor seed) -> Tensor");
  m.def(
      "lora_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scale, "
      "float dropout, Tensor seed, bool need_grad_x) -> (Tensor grad_x, Tensor grad_A, Tensor grad_B)");
  m.def("lora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> ()");
  m.def("dropout_mask(Tensor x, float dropout, Tensor seed) -> Tensor");
}
