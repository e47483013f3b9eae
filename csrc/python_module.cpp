// Makes the shared library importable as the Python module d9d._C; importing it runs the op registrations.
// Only setup.py compiles this file, so the other sources build without Python headers (see CMakeLists.txt).
#include <Python.h>

#include "cpu/amx_gemm.h"
#include "cpu/vec_kernels.h"

namespace {

// The build of the vectorized CPU kernels that the ops use in this process ("DEFAULT", "AVX2", "AVX512"), for
// benchmarks and tests.
PyObject* cpu_kernels_capability(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyUnicode_FromString(d9d::cpu::vec_kernels().capability);
}

// Whether the bfloat16 skinny products run on d9d's AMX kernels in this process (else on ATen's GEMMs).
PyObject* cpu_amx_bf16(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyBool_FromLong(d9d::amx_bf16_available() ? 1 : 0);
}

PyMethodDef methods[] = {
    {"cpu_kernels_capability", cpu_kernels_capability, METH_NOARGS,
     "The CPU capability whose build of the vectorized kernels the ops use."},
    {"cpu_amx_bf16", cpu_amx_bf16, METH_NOARGS, "Whether the bfloat16 skinny products run on d9d's AMX kernels."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Fused LoRA ops, registered as torch.ops.d9d.*", -1,
                               methods};
  return PyModule_Create(&module);
}
