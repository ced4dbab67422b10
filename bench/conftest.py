"""Benchmarks run on the CPU; each row compares implementations in one run (machines are noisy)."""
import torch


def pytest_configure(config):
    torch.manual_seed(0)
