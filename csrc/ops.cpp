// Every tsc op schema, in one place (the extension-cpp layout). Kernels register themselves beside
// their code with TORCH_LIBRARY_IMPL (CPU in *_cpu.cpp, CUDA in *_cuda.cu); the Python side adds
// register_fake and register_autograd (tsc_kernels/ops/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import tsc_kernels._C` loads this library, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(tsc, m) {
  // Residual update (SPEC.md §2): out = y + f * dt[c], ReLU fused when relu.
  m.def("residual_update(Tensor y, Tensor f, Tensor dt, bool relu) -> Tensor");
  // Backward in one pass: (dy, df, ddt). relu_out is the forward output when the ReLU was fused;
  // then dy is the gradient masked by the ReLU. Without it dy is the incoming gradient itself, so
  // the op returns an empty (0,) tensor there instead of copying it.
  m.def("residual_update_backward(Tensor grad, Tensor f, Tensor dt, Tensor? relu_out) -> (Tensor, Tensor, Tensor)");
}
