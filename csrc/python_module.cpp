// Makes the shared library importable as the Python module d9d._C; importing it runs the op registrations.
// Only setup.py compiles this file, so the other sources build without Python headers (see CMakeLists.txt).
#include <Python.h>

#include "cpu/vec_kernels.h"

namespace {

// The build of the vectorized CPU kernels that the ops use in this process ("DEFAULT", "AVX2", "AVX512"), for
// benchmarks and tests.
PyObject* cpu_kernels_capability(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyUnicode_FromString(d9d::cpu::vec_kernels().capability);
}

PyMethodDef methods[] = {
    {"cpu_kernels_capability", cpu_kernels_capability, METH_NOARGS,
     "The CPU capability whose build of the vectorized kernels the ops use."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Fused LoRA ops, registered as torch.ops.d9d.*", -1,
                               methods};
  return PyModule_Create(&module);
}
