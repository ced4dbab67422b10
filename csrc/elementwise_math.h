// Per-element helpers several ops' math shares (the fused ReLU and its gradient), on the host and
// the device (host_device.h).
#pragma once

#include "host_device.h"

namespace tsc {

// ReLU as torch.relu: NaN passes through (NaN < 0 is false).
template <typename T>
TSC_HD T relu_forward(T x) {
  return x < T(0) ? T(0) : x;
}

// Gradient through the fused ReLU, read from its output as torch's threshold_backward does:
// zero where out <= 0, the incoming gradient elsewhere (NaN outputs let the gradient through).
template <typename T>
TSC_HD T relu_backward(T grad, T out) {
  return out <= T(0) ? T(0) : grad;
}

}  // namespace tsc
