"""Triton kernels, each with a plain torch reference beside it (installed as splitnode.kernels)."""
