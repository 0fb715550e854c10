"""Error measures shared by the tests that compare against the float64 reference."""
from __future__ import annotations

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def fp32_grad_atol(logits: torch.Tensor, temperature: float, c: torch.Tensor | None, e: torch.Tensor | None) -> float:
    """Absolute error that fp32 arithmetic allows in dL/dlogits beyond a relative 1e-5.

    p = exp(z - lse) carries an absolute error of about eps * max|z| from lse, and for a
    near-certain token onehot - p cancels it into a large relative error of a small
    element (any fp32 implementation has it). The bound scales with the per-token
    coefficients c = dL/dlogprob and e = dL/dentropy, so a wrong formula still fails.
    """
    zmax = 1.0 + float(logits.detach().double().abs().max()) / temperature
    coef = 0.0 if c is None else float(c.double().norm())
    if e is not None:
        coef += float(e.double().norm()) * zmax
    return 8 * 6e-8 * zmax * coef / temperature
