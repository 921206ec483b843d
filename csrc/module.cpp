// Makes the extension importable as the Python module pvt_fast._C; importing it runs the static
// TORCH_LIBRARY_IMPL registrations of the other sources (the ops' schemas live in pvt_fast/ops).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pvt_fast CUDA kernels (registered with torch.ops)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
