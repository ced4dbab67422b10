"""torch.library registrations of every tsc op: fake kernels, autograd, and the torch (reference) backend."""
