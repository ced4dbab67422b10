// Scalar math of the TSC_LSTM controller (docs/tsc.md), shared verbatim by the CPU kernels
// (lstm_controller_cpu.cpp) and the CUDA kernels (lstm_controller_cuda.cu), so the CPU tests cover
// the arithmetic the GPU runs. The matrix-vector products around it are written per backend
// (vector lanes on CPU, warps on CUDA); everything per element lives here.
//
// T is the accumulation type: fp32, or fp64 for fp64 inputs (gradcheck).
#pragma once

#include <math.h>

#include "elementwise_math.h"  // TSC_HD, relu_forward, relu_backward

namespace tsc {

// expf/tanhf and exp/tanh exist both in host libm and in CUDA device code, so these overloads
// pick the single-precision function for float on either side (std::exp is host-only in nvcc).
TSC_HD float exp_acc(float x) { return expf(x); }
TSC_HD double exp_acc(double x) { return exp(x); }
TSC_HD float tanh_acc(float x) { return tanhf(x); }
TSC_HD double tanh_acc(double x) { return tanh(x); }

template <typename T>
TSC_HD T sigmoid(T x) {
  return T(1) / (T(1) + exp_acc(-x));
}

// d/dz sigmoid(z) read from its output y, as torch's sigmoid_backward does.
template <typename T>
TSC_HD T sigmoid_backward(T grad, T y) {
  return grad * y * (T(1) - y);
}

// The LSTM cell of torch.nn.LSTMCell for one hidden unit: pre-activations of the gates (i, f, g, o)
// = W_ih x + b_ih + W_hh h + b_hh in, activated gates, new cell state c and hidden state h out
// (the activated gates are what backward needs, so they overwrite the pre-activations in place).
template <typename T>
TSC_HD void lstm_cell_forward(T& i, T& f, T& g, T& o, T c_prev, T& c, T& h) {
  i = sigmoid(i);
  f = sigmoid(f);
  g = tanh_acc(g);
  o = sigmoid(o);
  c = f * c_prev + i * g;
  h = o * tanh_acc(c);
}

// Backward of lstm_cell_forward for one hidden unit. dh: gradient reaching h_d (from fc_out and
// from step d+1); dc: gradient reaching c_d from step d+1. Writes the gradients of the four gate
// pre-activations and returns the gradient reaching c_{d-1}.
template <typename T>
TSC_HD T lstm_cell_backward(T dh, T dc, T i, T f, T g, T o, T c, T c_prev, T& di, T& df, T& dg, T& dO) {
  const T tc = tanh_acc(c);
  dO = dh * tc * o * (T(1) - o);
  dc += dh * o * (T(1) - tc * tc);
  di = dc * g * i * (T(1) - i);
  df = dc * c_prev * f * (T(1) - f);
  dg = dc * i * (T(1) - g * g);
  return dc * f;
}

}  // namespace tsc
