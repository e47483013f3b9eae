// Makes the shared library importable as the Python module d9d._C; importing it runs the op registrations.
// Only setup.py compiles this file, so the other sources build without Python headers (see CMakeLists.txt).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Fused LoRA ops, registered as torch.ops.d9d.*", -1,
                               nullptr};
  return PyModule_Create(&module);
}
