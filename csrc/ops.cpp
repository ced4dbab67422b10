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
  // Residual update (docs/ops.md): out = y + f * dt[c], ReLU fused when relu.
  m.def("residual_update(Tensor y, Tensor f, Tensor dt, bool relu) -> Tensor");
  // Backward in one pass: (dy, df, ddt). relu_out is the forward output when the ReLU was fused;
  // then dy is the gradient masked by the ReLU. Without it dy is the incoming gradient itself, so
  // the op returns an empty (0,) tensor there instead of copying it.
  m.def("residual_update_backward(Tensor grad, Tensor f, Tensor dt, Tensor? relu_out) -> (Tensor, Tensor, Tensor)");
  // Fused BatchNorm tail (docs/ops.md): out = relu?(y + dt[c] * batch_norm(x)), returns (out,
  // save_mean, save_invstd); running statistics updated in place in training, as F.batch_norm.
  m.def("batch_norm_residual_update(Tensor y, Tensor x, Tensor dt, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor? weight, Tensor? bias, bool training, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  // Backward: one per-channel reduction and one elementwise pass: (dy, dx, ddt, dweight, dbias);
  // dy is empty without the fused ReLU (it is grad itself), dweight / dbias empty without affine.
  m.def("batch_norm_residual_update_backward(Tensor grad, Tensor x, Tensor dt, Tensor? weight, Tensor? bias, "
        "Tensor save_mean, Tensor save_invstd, Tensor? relu_out, bool training) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // scale_concat (docs/ops.md, scale_concat): out = cat([x, f * dt[c]], dim=1), TSC-DenseNet's
  // concatenation of a layer's scaled new features; out follows x's layout.
  m.def("scale_concat(Tensor x, Tensor f, Tensor dt) -> Tensor");
  // Backward in one pass over grad's last k channels: (df, ddt); dx is the view grad[:, :Cx].
  m.def("scale_concat_backward(Tensor grad, Tensor f, Tensor dt) -> (Tensor, Tensor)");
  // Weight-mean projection (docs/tsc.md): every given conv weight (C_out, C_in, *k) averaged over
  // C_in, flattened, concatenated into one 1-D tensor (fp32; fp64 for fp64 weights), one launch.
  m.def("weight_mean(Tensor[] weights) -> Tensor");
  // dw̄ / C_in of every weight, packed like w̄, one launch (weights are read for C_in only); the
  // autograd formula expands each slice over C_in (a stride-0 view): dW is never materialised.
  m.def("weight_mean_backward(Tensor grad, Tensor[] weights) -> Tensor");
  // Batched TSC_LSTM controller: every stage in one launch. wbar_packed: 1-D, stage s's (L_s, D_s)
  // rows back to back; blocks: L_s; params: 8 per stage (fc_in.weight, fc_in.bias, weight_ih,
  // weight_hh, bias_ih, bias_hh, fc_out.weight, fc_out.bias). Returns dt_packed (1-D, stage s's
  // (L_s, C_s) rows back to back) and saved (x, gates, c, h per stage, for backward).
  m.def("lstm_controller(Tensor wbar_packed, int[] blocks, Tensor[] params) -> (Tensor, Tensor)");
  // BPTT over every stage in one launch: (grad of wbar_packed, grads of params in params' order).
  m.def("lstm_controller_backward(Tensor grad, Tensor dt_packed, Tensor wbar_packed, int[] blocks, Tensor[] params, Tensor saved) -> (Tensor, Tensor[])");
  // Linear multi-step update (docs/ops.md, multistep_update): out = relu?((1 - k) u + k u_prev + keep[n] dt[c] f),
  // k a 0-d tensor, dt (C,) and keep (N,) optional (1 when absent).
  m.def("multistep_update(Tensor u, Tensor u_prev, Tensor f, Tensor k, Tensor? dt, Tensor? keep, bool relu) -> Tensor");
  // Backward in one pass + a fixed-order reduction: (du, du_prev, df, dk, ddt, dkeep); ddt / dkeep are
  // empty (0,) tensors when dt / keep are absent; relu_out is the forward output when the ReLU was fused.
  m.def("multistep_update_backward(Tensor grad, Tensor u, Tensor u_prev, Tensor f, Tensor k, Tensor? dt, Tensor? keep, "
        "Tensor? relu_out) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ODE stage combination (docs/ode.md): out = z + sum_i coeffs[i] * stages[i], 1 to 8 stages of
  // z's shape and dtype, coeffs fp32 (fp64 for fp64) of shape (len(stages),), one pass.
  m.def("ode_combine(Tensor z, Tensor[] stages, Tensor coeffs) -> Tensor");
  // Backward in one pass: (dstages, dcoeffs), dstages[i] = coeffs[i] * grad, dcoeffs[i] = sum(grad *
  // stages[i]) (deterministic); dz is grad itself.
  m.def("ode_combine_backward(Tensor grad, Tensor[] stages, Tensor coeffs) -> (Tensor[], Tensor)");
}
