"""The implementations' names and how the results group them: shared by impls (which builds
them) and report (which must read a results file without importing torch or the kernels).

Units: "logits" (the loss from (B, T, V) logits), "linear" (the loss from hidden states and
lm_head, issue 6) and "logprobs" (the forward-only log-prob pass of the old/ref policies,
token_logprobs under torch.no_grad()).

Calls (the `call` of a row, SPEC section 18): how the implementation is handed the model's
output. "bare": a (B, T, V) leaf, so no slice is charged; "trainer": the model's whole
(B, T+1, V) output, a leaf requiring grad, passed as it is (the gradient of the whole tensor
is the implementation's to write); "trainer-slice": the same leaf, passed as
logits[:, :-1], as TRL does, so autograd's slice backward (a zero fill and a copy of the
gradient) is part of the step; "forward": a no-grad pass (the logprobs unit); "hidden": the
fused-linear unit's hidden (B, T, H) and weight (V, H) leaves.
"""
from __future__ import annotations

LOGITS_IMPLS = ("eager", "compile", "liger", "trl", "ours-triton", "ours-trainer", "ours-2pass", "ours-torch",
                "ours-cuda")
LINEAR_IMPLS = ("ours-linear", "unfused", "liger-linear", "trl-linear")
LOGPROBS_IMPLS = ("ours-logprobs", "ours-logprobs-entropy", "trl-logprobs", "eager-logprobs")
ALL = LOGITS_IMPLS + LINEAR_IMPLS + LOGPROBS_IMPLS
UNITS = ("logits", "linear", "logprobs")
CALLS = ("bare", "trainer", "trainer-slice", "forward", "hidden")
# The peers a ratio is reported against (SPEC section 4: >= 5x eager, >= 1.3x the best peer).
BASELINES = ("eager", "compile", "liger", "trl")
PEERS = ("liger", "trl")
# The same for the fused-linear unit (issue 6 item 4: <= 1.15x unfused, >= 1.3x the faster peer).
LINEAR_BASELINES = ("unfused", "liger-linear", "trl-linear")
LINEAR_PEERS = ("liger-linear", "trl-linear")
# And for the forward-only pass (issue 20 item 3: TRL's kernel is the peer).
LOGPROBS_BASELINES = ("trl-logprobs", "eager-logprobs")
