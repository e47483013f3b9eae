// Makes the shared library importable as the Python module d9d._C; importing it runs the op registrations.
// Only setup.py compiles this file, so the other sources build without Python headers (see CMakeLists.txt).
#include <Python.h>

#include <c10/util/Exception.h>

#include <exception>

#include "cpu/skinny_gemm.h"
#include "cpu/vec_kernels.h"

namespace {

// The build of the vectorized CPU kernels that the ops use in this process ("DEFAULT", "AVX2", "AVX512"), for
// benchmarks and tests.
PyObject* cpu_kernels_capability(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyUnicode_FromString(d9d::cpu::vec_kernels().capability);
}

// What runs the bfloat16 skinny products in this process: "AMX", "AVX512_BF16" (d9d's kernels) or "ATen".
PyObject* cpu_bf16_kernels(PyObject* /*module*/, PyObject* /*unused*/) {
  try {
    return PyUnicode_FromString(d9d::cpu_bf16_kernels());
  } catch (const c10::Error& error) {  // a bad D9D_CPU_BF16_KERNELS
    PyErr_SetString(PyExc_RuntimeError, error.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_kernels_capability", cpu_kernels_capability, METH_NOARGS,
     "The CPU capability whose build of the vectorized kernels the ops use."},
    {"cpu_bf16_kernels", cpu_bf16_kernels, METH_NOARGS,
     "What runs the bfloat16 skinny products: AMX, AVX512_BF16 (d9d's kernels) or ATen."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Fused LoRA ops, registered as torch.ops.d9d.*", -1,
                               methods};
  return PyModule_Create(&module);
}
