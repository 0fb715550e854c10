"""Triton kernels: the vocabulary sweeps (logprobs.py) and the fused-linear sweeps (linear.py)."""
