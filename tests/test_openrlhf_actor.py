"""patch_actor against OpenRLHF 0.11.2's own Actor (openrlhf/models/actor.py), run here.

A tiny random Llama wrapped in OpenRLHF's `Actor`, in float32, on OpenRLHF-shaped batches
(left-padded prompts, right-padded responses, an action mask with holes). For each layout
(padded rows, `packing_samples`), temperature and sweep (logits, fused-linear), two deep copies
of the actor, one patched, are compared through OpenRLHF's own code:
- forward: the action log-probs and the response entropy, to 1e-5;
- the trainer's loss (ppo_actor.training_step's: OpenRLHF's PolicyLoss, the k3 KL loss of
  compute_approx_kl and the entropy bonus, all aggregated by aggregate_loss), to 1e-5;
- three SGD steps on that loss: every parameter to 1e-5.

OpenRLHF is loaded without flash_attn and deepspeed (tests/openrlhf_oracle.py); its
`compute_entropy` is torch.compile'd, and runs eagerly here (torch.compiler.set_stance
"force_eager": the same function, no Inductor build on a CPU test machine).
Ring attention runs on a one-rank gloo group (ring_flash_attn, which only receives the
cu_seqlens, stood in for): the slicing and gathering code paths of both forwards, not a split of
the sequence across ranks (that needs several processes, too slow for this suite).
"""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("openrlhf", reason="openrlhf 0.11.2 is not installed (Makefile)")
import openrlhf_oracle  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from grpo_kernels.integrations import openrlhf as ours  # noqa: E402

oracle = openrlhf_oracle.load()
Actor = oracle["actor"].Actor
PolicyLoss, aggregate_loss = oracle["loss"].PolicyLoss, oracle["loss"].aggregate_loss
compute_approx_kl = oracle["utils"].compute_approx_kl

V, PROMPT, A = 40, 4, 5
TOL = 1e-5


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).float()


def make_actor(packing: bool, temperature: float, seed: int = 0):
    actor = Actor(tiny_model(seed), temperature=temperature)
    actor.packing_samples = packing  # Actor sets it only when it loads the model itself
    return actor


def make_batch(seed: int = 0, B: int = 3) -> dict:
    """OpenRLHF's experience layout: sequences (B, PROMPT + A), left-padded prompts, right-padded
    responses; action_mask (B, A) the valid response tokens (one more hole in row 0)."""
    g = torch.Generator().manual_seed(seed)
    S = PROMPT + A
    sequences = torch.randint(1, V, (B, S), generator=g)
    attention_mask = torch.ones(B, S, dtype=torch.long)
    prompt_pad, response_len = [0, 2, 1][:B], [A, 3, 4][:B]
    for i in range(B):
        attention_mask[i, :prompt_pad[i]] = 0
        attention_mask[i, PROMPT + response_len[i]:] = 0
    sequences = sequences * attention_mask
    action_mask = attention_mask[:, PROMPT:].bool().clone()
    action_mask[0, 2] = False
    return dict(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
                advantages=torch.randn(B, A, generator=g), noise=0.3 * torch.randn(B, A, generator=g))


def forward(actor, batch: dict, **kw):
    with torch.compiler.set_stance("force_eager"):
        return actor(batch["sequences"], batch["action_mask"], attention_mask=batch["attention_mask"],
                     return_output=True, return_entropy=True, **kw)


def training_loss(actor, batch: dict, old: torch.Tensor, ref: torch.Tensor):
    """ActorPPOTrainer.training_step's loss (openrlhf/trainer/ray/ppo_actor.py), with its local
    normalisers: PolicyLoss + kl_coef * aggregate_loss(k3 KL) - entropy_coef * aggregate_loss(entropy)."""
    log_probs, output = forward(actor, batch)
    mask = batch["action_mask"]
    policy_loss, *_ = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)(log_probs, old, batch["advantages"],
                                                                       action_mask=mask)
    kl = compute_approx_kl(log_probs, ref, log_probs_old=old, kl_estimator="k3")
    entropy = aggregate_loss(output.entropy[:, -mask.shape[1]:], mask)
    return policy_loss + 0.1 * aggregate_loss(kl, mask) - 0.01 * entropy, log_probs, output


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach() - want.detach()).abs().max() / want.detach().abs().max().clamp(min=1.0))


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused_linear"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_patched_actor_trains_as_openrlhf(fused_linear: bool, packing: bool, temperature: float) -> None:
    batch = make_batch()
    theirs = make_actor(packing, temperature)
    mine = ours.patch_actor(copy.deepcopy(theirs), fused_linear=fused_linear)
    mask = batch["action_mask"]
    with torch.no_grad():  # the experience: old and reference log-probs, from OpenRLHF's forward
        base, _ = forward(theirs, batch)
        old, ref = base + batch["noise"] * mask, base - batch["noise"].flip(0) * mask
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.5)
    opt_mine = torch.optim.SGD(mine.parameters(), lr=0.5)
    for step in range(3):
        want, want_lp, want_out = training_loss(theirs, batch, old, ref)
        got, got_lp, got_out = training_loss(mine, batch, old, ref)
        assert got_lp.dtype == torch.float32 and got_lp.shape == want_lp.shape
        assert max_rel(got_lp, want_lp) <= TOL, f"step {step}: log-probs"
        entropy = lambda out: out.entropy[:, -A:] * mask  # noqa: E731  (the response tokens)
        assert got_out.entropy.shape == want_out.entropy.shape
        assert max_rel(entropy(got_out), entropy(want_out)) <= TOL, f"step {step}: entropy"
        assert abs(got.item() - want.item()) <= TOL * max(1.0, abs(want.item())), f"step {step}: loss"
        for opt, loss in ((opt_theirs, want), (opt_mine, got)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        for (name, p), q in zip(theirs.named_parameters(), mine.parameters()):
            assert max_rel(q, p) <= TOL, f"step {step}: {name}"
    assert max_rel(theirs.model.lm_head.weight, make_actor(packing, temperature).model.lm_head.weight) > 1e-3


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused_linear"])
def test_ring_attention_one_rank(fused_linear: bool, tmp_path, monkeypatch) -> None:
    """With a ring-attention group, the packed rows go through OpenRLHF's slicing and gathering in
    both forwards: log-probs, entropy and the gradient of the trainer's loss agree."""
    stub = types.ModuleType("ring_flash_attn")
    stub.update_ring_flash_attn_params = lambda cu_seqlens, group: None
    monkeypatch.setitem(sys.modules, "ring_flash_attn", stub)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        oracle["ring_attn_utils"].set_ring_attn_group(group)  # as OpenRLHF's strategy does
        batch = make_batch(2)
        theirs = make_actor(True, 0.9)
        mine = ours.patch_actor(copy.deepcopy(theirs), fused_linear=fused_linear)
        results = []
        for actor in (theirs, mine):
            log_probs, output = forward(actor, batch, ring_attn_group=group)
            loss = aggregate_loss(log_probs - 0.1 * output.entropy[:, -A:], batch["action_mask"])
            loss.backward()
            results.append((log_probs, output.entropy[:, -A:] * batch["action_mask"],
                            [p.grad for p in actor.parameters()]))
        (want_lp, want_ent, want_grads), (got_lp, got_ent, got_grads) = results
        assert max_rel(got_lp, want_lp) <= TOL and max_rel(got_ent, want_ent) <= TOL
        for got, want in zip(got_grads, want_grads):
            assert max_rel(got, want) <= TOL
    finally:
        oracle["ring_attn_utils"].set_ring_attn_group(None)
        dist.destroy_process_group()


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_full_log_probs_and_logits_calls(packing: bool) -> None:
    """return_logprobs without an action mask gives every position's log-prob (all rows swept);
    a call for the logits themselves runs OpenRLHF's own forward."""
    batch = make_batch(1)
    theirs = make_actor(packing, 0.8)
    mine = ours.patch_actor(copy.deepcopy(theirs))
    args = (batch["sequences"],)
    kw = dict(attention_mask=batch["attention_mask"])
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        want, got = theirs(*args, return_logprobs=True, **kw), mine(*args, return_logprobs=True, **kw)
        assert got.shape == want.shape and max_rel(got, want) <= TOL
        want, got = theirs(*args, return_output=True, **kw), mine(*args, return_output=True, **kw)
        assert torch.equal(got["logits"], want["logits"])


def test_unpatch_restores_openrlhf() -> None:
    actor = make_actor(False, 1.0)
    original = actor.forward
    ours.patch_actor(actor)
    assert actor.forward != original and actor._grpo_kernels["fused_linear"] is False
    ours.patch_actor(actor, fused_linear=True)  # patching again keeps OpenRLHF's forward underneath
    assert actor._grpo_kernels["forward"] == original
    ours.unpatch_actor(actor)
    assert actor.forward == original and not hasattr(actor, "_grpo_kernels")


def _with(actor, **config):
    for key, value in config.items():
        setattr(actor.model.config, key, value)
    return actor


@pytest.mark.parametrize("change, match", [
    (lambda a: _with(a, final_logit_softcapping=30.0), "final_logit_softcapping"),
    (lambda a: _with(a, logit_scale=0.5), "logit_scale"),
    (lambda a: _with(a, output_router_logits=True), "output_router_logits"),
    (lambda a: setattr(a, "is_vlm", True), "is_vlm"),
    (lambda a: setattr(a.model, "lm_head", torch.nn.Sequential(a.model.lm_head)), "LM head of type Sequential"),
])
def test_unsupported_fused_linear_options_raise(change, match: str) -> None:
    actor = make_actor(False, 1.0)
    change(actor)
    with pytest.raises(ours.UnsupportedOpenRLHFOption, match=match):
        ours.patch_actor(actor, fused_linear=True)
    ours.patch_actor(actor)  # the logits sweep computes what the model's forward returns


def test_zero3_partitioned_lm_head_raises() -> None:
    actor = ours.patch_actor(make_actor(False, 1.0), fused_linear=True)
    actor.model.lm_head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    batch = make_batch()
    with pytest.raises(ours.UnsupportedOpenRLHFOption, match="ZeRO-3"):
        actor(batch["sequences"], batch["action_mask"], attention_mask=batch["attention_mask"])


def test_bad_arguments_raise() -> None:
    with pytest.raises(TypeError, match="actor"):
        ours.patch_actor(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="fused_linear"):
        ours.patch_actor(make_actor(False, 1.0), fused_linear="yes")
    with pytest.raises(ValueError, match="backend"):
        ours.patch_actor(make_actor(False, 1.0), backend="fast")


def test_install_patches_the_trainer_modules(monkeypatch) -> None:
    """install() on modules shaped like OpenRLHF's trainer modules (ppo_actor imports Actor and
    PolicyLoss, launcher imports Actor; the real ones import ray, deepspeed and vllm): every
    Actor built afterwards is patched, the PolicyLoss is ours; uninstall() restores them."""
    ppo_actor = types.ModuleType("fake.ppo_actor")
    ppo_actor.Actor, ppo_actor.PolicyLoss = Actor, PolicyLoss
    launcher = types.ModuleType("fake.launcher")
    launcher.Actor = Actor
    monkeypatch.setenv(ours.FUSED_LINEAR_ENV, "1")
    done = ours.install(modules=[ppo_actor, launcher])
    assert done == ["fake.ppo_actor.Actor", "fake.ppo_actor.PolicyLoss", "fake.launcher.Actor"]
    assert ppo_actor.PolicyLoss is ours.PolicyLoss
    actor = ppo_actor.Actor(tiny_model(), temperature=0.9)
    assert isinstance(actor, Actor) and actor._grpo_kernels["fused_linear"] is True
    assert ours.install(fused_linear=False, modules=[launcher]) == ["fake.launcher.Actor"]  # again: no double wrap
    assert launcher.Actor.__mro__[1] is Actor
    ours.uninstall(modules=[ppo_actor, launcher])
    assert (ppo_actor.Actor, ppo_actor.PolicyLoss, launcher.Actor) == (Actor, PolicyLoss, Actor)
