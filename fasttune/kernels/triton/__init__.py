"""Triton kernels for CUDA (one op per file). Importing this package does not import triton; the op modules do.

Each module here holds private ``@triton.jit`` kernels and plain-Python launchers that take and return torch tensors;
the autograd functions in ``fasttune.kernels`` call the launchers. Kernels load any dtype and compute in fp32.
Tests run them on CPU with ``TRITON_INTERPRET=1``.
"""
