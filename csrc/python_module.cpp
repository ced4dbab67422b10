// The Python module tsc_kernels._C: `import tsc_kernels._C` loads this library, which runs the
// static registrations of every file in csrc/. There is no TORCH_LIBRARY(tsc, ...) block: each op
// registers itself beside its code, as torchvision's csrc/ops/*.cpp do:
//   csrc/<op>_cpu.cpp       TORCH_LIBRARY_FRAGMENT(tsc, m): the schemas of tsc::<op> and
//                           tsc::<op>_backward; TORCH_LIBRARY_IMPL(tsc, CPU, m): the CPU kernels
//   csrc/<op>_cuda.cu       TORCH_LIBRARY_IMPL(tsc, CUDA, m): the CUDA kernels
//   csrc/<op>_autograd.cpp  TORCH_LIBRARY_IMPL(tsc, Autograd, m), where the op's autograd is in C++
//                           (autograd_util.h); the others' is registered by the Python side
//   csrc/<op>_plan.cpp      the CUDA launch plan (launch_plan.h), host code in every build
// The Python side (tsc_kernels/ops/) adds register_fake and the remaining autograd formulas through
// torch.library.Library("tsc", "FRAGMENT").
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
