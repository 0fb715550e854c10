"""End to end: TRL 1.16's GRPOTrainer with and without grpo_kernels' drop-in, on the CPU.

A tiny Llama (hidden 32, 2 layers, 253 tokens, random weights) and a word-level tokenizer are
built in memory and saved to a temporary directory, so nothing is downloaded (beta != 0 makes
TRL load its reference model from the model's path). Each case trains 3 steps twice from the
same seed, once with plain GRPOTrainer and once with the drop-in, and compares every logged
value (losses, grad norms, TRL's loss metrics under TRL's names, rewards) and the parameter
updates. Plain SGD keeps the update linear in the gradient, so an fp32 rounding difference in
the loss stays a rounding difference in the parameters (Adam divides tiny gradients by their
own magnitude and would amplify it).

The model is nudged to end completions early (its EOS row of the LM head is scaled up), so
masks have holes, and the learning rate is large enough that with num_iterations=2 the
second pass sees ratios far outside the clip band on both sides.

The generated completions of later steps depend on the updated weights; the runs agree to
~1e-7, far from any sampling boundary in practice, so both runs see the same batches (the
identical reward logs check it).
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import base_trainer

import grpo_kernels
from grpo_kernels.integrations.trl import FusedGRPOTrainer, patch_grpo_trainer

WORDS = [f"w{i}" for i in range(250)]
EOS_ID = 1
# Logged values that measure the machine rather than the loss.
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}
RTOL, ATOL = 1e-5, 1e-6  # fp32 end to end; ATOL for values that are ~0 (first-step losses, zero clip ratios)


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    """Nothing leaves the machine: TRL pings the Hub when a trainer is built."""
    monkeypatch.setattr(base_trainer._BaseTrainer, "_send_telemetry", lambda self: None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A random tiny Llama and a word-level tokenizer, saved where TRL can reload the reference model."""
    vocab = {"<pad>": 0, "<eos>": EOS_ID, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side="left")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # EOS likely in some contexts: completions of 1 to 8 tokens, masks with holes
        model.lm_head.weight[EOS_ID] *= 12.0
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def reward_multiple_of_three(completions: list[str], **kwargs) -> list[float]:
    return [float(sum(int(w[1:]) % 3 == 0 for w in c.split() if w[1:].isdigit())) for c in completions]


PROMPTS = Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3 + i % 3]) for i in range(0, 40, 5)]})
# bf16=False: TRL defaults to bf16=True, which on the CPU runs the forward under bf16 autocast.
BASE_CONFIG = dict(max_steps=3, per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                   learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", use_cpu=True, bf16=False,
                   report_to="none", logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                   dataloader_num_workers=0)


def train(model_dir: str, tmp_path, drop_in: str | None, config: dict, **drop_in_options) -> dict:
    """Train from `model_dir`; returns the logged values per step and the parameter updates.

    drop_in: None (plain GRPOTrainer), "subclass" (FusedGRPOTrainer) or "patch" (patch_grpo_trainer).
    """
    args = GRPOConfig(output_dir=str(tmp_path / "out"), **{**BASE_CONFIG, **config})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    kwargs = dict(model=model, reward_funcs=reward_multiple_of_three, args=args, train_dataset=PROMPTS,
                  processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir))
    if drop_in == "subclass":
        trainer = FusedGRPOTrainer(**kwargs, backend="torch", **drop_in_options)
    else:
        trainer = GRPOTrainer(**kwargs)
        if drop_in == "patch":
            patch_grpo_trainer(trainer, backend="torch", **drop_in_options)
    trainer.train()
    logs = [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in trainer.state.log_history]
    updates = {name: p.detach() - before[name] for name, p in trainer.model.named_parameters()}
    return {"logs": logs, "updates": updates}


_reference_runs: dict[tuple, dict] = {}


def train_trl(model_dir: str, tmp_path, config: dict) -> dict:
    """Plain TRL, once per configuration (both heads compare against the same run)."""
    key = tuple(sorted(config.items()))
    if key not in _reference_runs:
        _reference_runs[key] = train(model_dir, tmp_path, None, config)
    return _reference_runs[key]


def assert_same_training(ours: dict, trl: dict) -> None:
    assert len(ours["logs"]) == len(trl["logs"])
    for step, (mine, theirs) in enumerate(zip(ours["logs"], trl["logs"])):
        assert mine.keys() == theirs.keys(), f"step {step}: logged names differ: {mine.keys() ^ theirs.keys()}"
        for name in theirs:
            torch.testing.assert_close(torch.tensor(float(mine[name]), dtype=torch.float64),
                                       torch.tensor(float(theirs[name]), dtype=torch.float64),
                                       rtol=RTOL, atol=ATOL, equal_nan=True, msg=lambda m: f"step {step}, {name}: {m}")
    error = update_error(ours, trl)
    assert error < RTOL, f"parameter updates differ: relative error {error:.2e}"


def update_error(ours: dict, trl: dict) -> float:
    """|Δθ_ours - Δθ_trl| / |Δθ_trl| over all parameters."""
    num = sum(((ours["updates"][n] - u) ** 2).sum() for n, u in trl["updates"].items()) ** 0.5
    den = sum((u ** 2).sum() for u in trl["updates"].values()) ** 0.5
    assert den > 0, "the parameters did not move"
    return float(num / den)


@pytest.mark.parametrize("head", ["hidden", "logits"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_same_training_as_trl(model_dir, tmp_path, head, beta, num_iterations):
    config = dict(beta=beta, num_iterations=num_iterations)
    trl = train_trl(model_dir, tmp_path, config)
    ours = train(model_dir, tmp_path, "subclass", config, head=head)
    assert_same_training(ours, trl)
    if num_iterations == 2:  # the comparison has teeth: the second pass clips (ratios left the band)
        assert max(e.get("clip_ratio/region_mean", 0.0) for e in trl["logs"]) > 0.1


# Each case exercises a different part of the mapping: (GRPOConfig fields, entry point, drop-in options).
# Heads and entry points alternate so that every combination runs somewhere.
HIDDEN, LOGITS = dict(head="hidden"), dict(head="logits")
CASES = {
    # GA 2 with 4 micro-batches per generation: the dapo normaliser's GA / steps_per_generation factor,
    # old log-probs present (GA % steps_per_generation != 0) and TRL's own division points.
    "dapo-accumulation": (dict(per_device_train_batch_size=2, gradient_accumulation_steps=2,
                               steps_per_generation=4, max_steps=2), "subclass", HIDDEN),
    "grpo-delta": (dict(loss_type="grpo", delta=1.5, beta=0.04, num_iterations=2), "subclass",
                   dict(head="logits", inplace_backward=True)),
    "bnpo-masks": (dict(loss_type="bnpo", num_iterations=2, top_entropy_quantile=0.37,
                        off_policy_mask_threshold=0.05), "patch", HIDDEN),
    "dr_grpo-entropy-bonus": (dict(loss_type="dr_grpo", entropy_coef=0.01, num_iterations=2), "patch", LOGITS),
    "dapo-entropy-bonus-accumulation": (dict(entropy_coef=0.01, per_device_train_batch_size=2,
                                             gradient_accumulation_steps=2, max_steps=2), "subclass", HIDDEN),
    "dr_grpo-truncated": (dict(loss_type="dr_grpo", mask_truncated_completions=True, num_iterations=2, beta=0.04),
                          "subclass", LOGITS),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.1, num_iterations=2), "patch", HIDDEN),
    "sapo": (dict(loss_type="sapo", num_iterations=2, beta=0.04), "patch", LOGITS),
    "vespo": (dict(loss_type="vespo", num_iterations=2), "subclass", HIDDEN),
    "luspo-gspo": (dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2), "subclass",
                   LOGITS),
    # TRL's sequence-ratio KL weight under GSPO, opted into.
    "gspo-kl-sequence": (dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, num_iterations=2),
                         "patch", dict(head="hidden", kl_ratio="sequence")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_variants_same_training_as_trl(model_dir, tmp_path, case):
    config, entry, options = CASES[case]
    trl = train_trl(model_dir, tmp_path, config)
    ours = train(model_dir, tmp_path, entry, config, **options)
    assert_same_training(ours, trl)


def test_gspo_kl_defaults_to_per_token_ratio(model_dir, tmp_path, caplog):
    """Under GSPO with a KL term the drop-in keeps the per-token ratio by default: it warns, and the
    numbers differ from TRL's in the KL-carrying values only."""
    config = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, num_iterations=2)
    with caplog.at_level(logging.WARNING, logger="grpo_kernels.integrations.trl"):
        ours = train(model_dir, tmp_path, "subclass", config)
    assert "kl_ratio='sequence'" in caplog.text
    trl = train_trl(model_dir, tmp_path, config)
    second = 1  # the first off-policy step: ratios != 1, so the two weights differ
    assert ours["logs"][second]["kl"] != pytest.approx(trl["logs"][second]["kl"], rel=1e-4)
    assert ours["logs"][0]["reward"] == trl["logs"][0]["reward"]


def _build(model_dir, tmp_path, **config) -> GRPOTrainer:
    args = GRPOConfig(output_dir=str(tmp_path / "out"), **{**BASE_CONFIG, **config})
    return GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=reward_multiple_of_three,
                       args=args, train_dataset=PROMPTS,
                       processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir))


@pytest.mark.parametrize("config, message", [
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
    (dict(top_entropy_quantile=0.5, entropy_coef=0.01), "top_entropy_quantile < 1 together with entropy_coef"),
    (dict(delta=1.1), "delta must be > 1 + epsilon_high"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), "vespo"),
])
def test_unsupported_configurations_fail_when_built(model_dir, tmp_path, config, message):
    trainer = _build(model_dir, tmp_path, **config)
    with pytest.raises(ValueError, match=re.escape(message)):
        patch_grpo_trainer(trainer)


def test_bad_options_and_double_patch(model_dir, tmp_path):
    trainer = _build(model_dir, tmp_path)
    with pytest.raises(ValueError, match="head must be one of"):
        patch_grpo_trainer(trainer, head="lm_head")
    with pytest.raises(ValueError, match="kl_ratio must be one of"):
        patch_grpo_trainer(trainer, kl_ratio="mean")
    with pytest.raises(ValueError, match="inplace_backward=True applies to head='logits'"):
        patch_grpo_trainer(trainer, inplace_backward=True)
    patch_grpo_trainer(trainer)
    with pytest.raises(ValueError, match="already"):
        patch_grpo_trainer(trainer)


def _library_error(head: str, backend: str) -> str:
    """The message grpo_kernels itself raises at the first step, on CPU tensors."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises((RuntimeError, ValueError)) as error:
        if head == "hidden":
            grpo_kernels.fused_linear_grpo_loss(torch.zeros(1, 1, 4), torch.zeros(3, 4), ids, torch.zeros(1),
                                                backend=backend)
        else:
            grpo_kernels.fused_grpo_loss(torch.zeros(1, 1, 3), ids, torch.zeros(1), backend=backend)
    return str(error.value)


@pytest.mark.parametrize("drop_in", ["patch", "subclass"])
@pytest.mark.parametrize("head, backend, interpret", [
    ("hidden", "cuda", "1"),    # the fused-linear sweep has no CUDA C++ backend, on any device
    ("hidden", "triton", "0"),  # Triton on the CPU only under its interpreter
    ("logits", "triton", "0"),
    ("logits", "cuda", "1"),    # the CUDA C++ sweep needs CUDA tensors
])
def test_impossible_backend_fails_when_built(model_dir, tmp_path, monkeypatch, drop_in, head, backend, interpret):
    """Rejected when the trainer is built, not at its first step, with the library's own message."""
    if interpret == "1":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expected = _library_error(head, backend)
    if drop_in == "patch":
        trainer = _build(model_dir, tmp_path)
        with pytest.raises(ValueError) as error:
            patch_grpo_trainer(trainer, head=head, backend=backend)
        assert not hasattr(trainer, "_grpo_kernels")
    else:
        args = GRPOConfig(output_dir=str(tmp_path / "out"), **BASE_CONFIG)
        with pytest.raises(ValueError) as error:
            FusedGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                             reward_funcs=reward_multiple_of_three, args=args, train_dataset=PROMPTS,
                             processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
                             head=head, backend=backend)
    assert str(error.value) == expected


def test_possible_backends_build(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton runs on the CPU under its interpreter
    for head, backend in [("hidden", "triton"), ("hidden", "torch"), ("logits", "triton"), ("logits", "auto")]:
        patch_grpo_trainer(_build(model_dir, tmp_path), head=head, backend=backend)


def test_soft_capped_logits_need_the_logits_head(model_dir, tmp_path):
    trainer = _build(model_dir, tmp_path)
    trainer.model.config.final_logit_softcapping = 30.0  # as Gemma 2 declares it
    with pytest.raises(ValueError, match="soft-capping"):
        patch_grpo_trainer(trainer)  # head="hidden" cannot apply it
    with pytest.raises(ValueError, match="inplace_backward=True with logit soft-capping"):
        patch_grpo_trainer(trainer, head="logits", inplace_backward=True)
    patch_grpo_trainer(trainer, head="logits")


def test_refuses_a_subclass_with_its_own_loss(model_dir, tmp_path):
    class OtherLoss(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            return super()._compute_loss(model, inputs) * 2

    args = GRPOConfig(output_dir=str(tmp_path / "out"), **BASE_CONFIG)
    trainer = OtherLoss(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=reward_multiple_of_three,
                        args=args, train_dataset=PROMPTS,
                        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir))
    with pytest.raises(ValueError, match="overrides GRPOTrainer._compute_loss"):
        patch_grpo_trainer(trainer)


@pytest.mark.parametrize("head", ["hidden", "logits"])
def test_bf16_autocast_same_training_as_trl(model_dir, tmp_path, head):
    """TRL's default bf16=True: on the CPU the forward runs under bf16 autocast, where TRL's fused head
    multiplies in bf16 and accumulates in fp32, as ours does. The two differ by bf16 rounding only."""
    config = dict(bf16=True, beta=0.04, num_iterations=2)
    trl = train_trl(model_dir, tmp_path, config)
    ours = train(model_dir, tmp_path, "subclass", config, head=head)
    assert [e.keys() for e in ours["logs"]] == [e.keys() for e in trl["logs"]]
    for mine, theirs in zip(ours["logs"], trl["logs"]):
        for name in ("loss", "grad_norm", "kl", "entropy", "clip_ratio/region_mean"):
            if name in theirs:
                assert mine[name] == pytest.approx(theirs[name], rel=2e-2, abs=1e-4), name
    assert update_error(ours, trl) < 2e-2


def test_evaluate_same_as_trl(model_dir, tmp_path):
    """Eval mode: no accumulation scaling, TRL's eval normaliser for dapo."""
    def evaluate(drop_in: bool) -> dict:
        args = GRPOConfig(output_dir=str(tmp_path / "out"), **{**BASE_CONFIG, "beta": 0.04},
                          per_device_eval_batch_size=4)
        kwargs = dict(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=reward_multiple_of_three,
                      args=args, train_dataset=PROMPTS, eval_dataset=PROMPTS,
                      processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir))
        trainer = FusedGRPOTrainer(**kwargs, backend="torch") if drop_in else GRPOTrainer(**kwargs)
        return {k: v for k, v in trainer.evaluate().items() if "runtime" not in k and "per_second" not in k}

    ours, trl = evaluate(True), evaluate(False)
    assert ours.keys() == trl.keys()
    for name in trl:
        assert ours[name] == pytest.approx(trl[name], rel=RTOL, abs=ATOL), name


def _loss_grads_metrics(trainer: GRPOTrainer, inputs: dict) -> tuple[float, dict, dict]:
    """One compute_loss and backward on a given batch: the loss, the gradients, the logged metrics."""
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    return loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def assert_same_step(ours: tuple, trl: tuple) -> None:
    (loss, grads, metrics), (trl_loss, trl_grads, trl_metrics) = ours, trl
    assert loss == pytest.approx(trl_loss, rel=RTOL, abs=ATOL)
    assert metrics.keys() == trl_metrics.keys()
    for name in trl_metrics:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=RTOL, abs=ATOL), name
    num = sum(((grads[n] - g) ** 2).sum() for n, g in trl_grads.items()) ** 0.5
    den = sum((g ** 2).sum() for g in trl_grads.values()) ** 0.5
    assert num / den < RTOL


@pytest.mark.parametrize("loss_type, mode", [("dapo", "sequence_mask"), ("grpo", "token_mask"),
                                             ("vespo", "token_truncate")])
def test_vllm_importance_sampling_inputs(model_dir, tmp_path, loss_type, mode):
    """The vLLM inputs without vLLM: one TRL batch, given a sampler's log-probs and an importance
    ratio, through TRL's _compute_loss and ours: the same loss, gradients and metrics. Checks the
    rollout_is_ratio mapping (folded into VESPO's weight) and the off-policy mask's use of the
    sampler's log-probs."""
    trainer = _build(model_dir, tmp_path, loss_type=loss_type, beta=0.04, num_iterations=2,
                     off_policy_mask_threshold=0.02, vllm_importance_sampling_mode=mode)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train otherwise
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    g = torch.Generator().manual_seed(0)
    B, T = inputs["completion_ids"].shape
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] + 0.3 * torch.randn(B, T, generator=g)
    inputs["importance_sampling_ratio"] = 0.5 + torch.rand(B, 1 if mode.startswith("sequence") else T, generator=g)
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True  # what TRL's _compute_loss reads

    trl = _loss_grads_metrics(trainer, inputs)
    patch_grpo_trainer(trainer, backend="torch")
    ours = _loss_grads_metrics(trainer, inputs)
    assert_same_step(ours, trl)


def test_dapo_normaliser_below_one(model_dir, tmp_path):
    """TRL clamps the token count at 1 before rescaling it to one accumulation window, so its dapo
    normaliser can fall below 1 (here 1 token * 1 / 4 micro-batches per generation); grpo_kernels
    clamps the normaliser itself, and the drop-in rescales exactly. Entropy bonus on."""
    trainer = _build(model_dir, tmp_path, loss_type="dapo", entropy_coef=0.01)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    inputs["num_items_in_batch"] = torch.tensor(1)
    trainer.args.steps_per_generation = 4  # read only by the normaliser once the batch exists

    trl = _loss_grads_metrics(trainer, inputs)
    patch_grpo_trainer(trainer, backend="torch")
    ours = _loss_grads_metrics(trainer, inputs)
    assert_same_step(ours, trl)


# Two processes (gloo on the CPU): the normaliser's num_processes, the cross-rank reductions of the
# metrics (sequence-level counts included), gradient accumulation with steps_per_generation != GA,
# the entropy bonus, and DDP's unused-parameter search (find_unused_parameters=True, the Trainer's
# default without gradient checkpointing), which must find the LM head that head="hidden" uses
# after the forward.
DDP_CASES = {
    "dapo": dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, steps_per_generation=4,
                 entropy_coef=0.01, beta=0.04, max_steps=2, ddp_find_unused_parameters=True),
    "luspo-gspo": dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2,
                       off_policy_mask_threshold=0.05, gradient_checkpointing=False),
}


def test_ddp_two_processes_same_training_as_trl(model_dir, tmp_path):
    out = tmp_path / "runs.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               model_dir, str(tmp_path), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = torch.load(out)
    for case in DDP_CASES:
        for head in ("hidden", "logits"):
            assert_same_training(runs[case, head], runs[case, "trl"])


def _ddp_worker(model_dir: str, tmp_dir: str, out: str) -> None:
    """One rank of test_ddp_two_processes_same_training_as_trl: every run in one process group."""
    from pathlib import Path

    base_trainer._BaseTrainer._send_telemetry = lambda self: None
    runs = {}
    for case, config in DDP_CASES.items():
        runs[case, "trl"] = train(model_dir, Path(tmp_dir), None, config)
        for head in ("hidden", "logits"):
            runs[case, head] = train(model_dir, Path(tmp_dir), "subclass", config, head=head)
    if int(os.environ["RANK"]) == 0:
        torch.save(runs, out)
    # Leave the process group before the interpreter exits: gloo's threads torn down by the exit
    # itself can abort a rank ("terminate called without an active exception").
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    _ddp_worker(*sys.argv[1:])
