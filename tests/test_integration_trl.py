"""rlfuse's GRPOTrainer against TRL's own: same losses, gradients and metrics, on a tiny random Llama (CPU).

The oracle is always ``trl.GRPOTrainer`` itself, run on an identical copy of the model and batch.
"""

import copy
import math
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

import rlfuse.integrations.trl as rlfuse_trl  # noqa: E402
import rlfuse.integrations.trl_head as trl_head  # noqa: E402
from rlfuse.integrations.trl import GRPOTrainer  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!+-="


def make_tokenizer():
    """A character-level tokenizer built offline: <pad>=0, <eos>=1, <unk>=2, then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def make_model(tie_word_embeddings=True, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(CHARS) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie_word_embeddings, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    return LlamaForCausalLM(config).float()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny random Llama with tied embeddings and its tokenizer: TRL loads its reference model by path."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_model().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def grpo_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, steps_per_generation=2,
                  max_completion_length=8, max_steps=2, learning_rate=0.5, optim="sgd", max_grad_norm=0.0,
                  logging_steps=1, report_to="none", save_strategy="no", seed=0, use_cpu=True, bf16=False,
                  dataloader_num_workers=0, epsilon_high=0.28, beta=0.05, temperature=0.7)
    kwargs.update(overrides)
    return trl.GRPOConfig(**kwargs)


def dataset():
    return datasets.Dataset.from_dict({"prompt": ["what is 2+2?", "say hi", "count to 3", "abc"]})


class GradRecorder(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def train(trainer_cls, model, tmp_path, peft_config=None, **overrides):
    """Train for ``max_steps``; return the logged losses, each step's gradients and the trainer."""
    recorder = GradRecorder()
    trainer = trainer_cls(model, reward_funcs=reward_len, args=grpo_args(tmp_path, **overrides),
                          train_dataset=dataset(), processing_class=make_tokenizer(), callbacks=[recorder],
                          peft_config=peft_config)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, recorder.grads, trainer


def assert_grads_close(ours, theirs, atol=1e-5, rtol=1e-4):
    assert ours.keys() == theirs.keys() and ours
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


class CallCounter:
    def __init__(self, monkeypatch, module, name):
        self.calls, original = 0, getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("overrides", [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-3, epsilon_high=4e-3),
])
def test_two_training_steps_match_trl(model_dir, tmp_path, monkeypatch, overrides):
    """Two optimizer steps of TRL's trainer with and without rlfuse: one generation batch serves both steps,
    so the second step is off-policy (old log-probs and clipping), and beta > 0 loads a reference model."""
    fused = CallCounter(monkeypatch, trl_head, "linear_token_logprobs")
    losses_ref, grads_ref, trainer_ref = train(trl.GRPOTrainer, model_dir, tmp_path / "trl", **overrides)
    assert fused.calls == 0
    losses, grads, trainer = train(GRPOTrainer, model_dir, tmp_path / "rlfuse", **overrides)
    assert fused.calls > 0  # the fused-linear path ran, not a fallback

    assert len(losses) == len(losses_ref) == 2 and len(grads) == len(grads_ref) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), atol=1e-5, rtol=1e-5)
    for step_grads, step_grads_ref in zip(grads, grads_ref):
        assert_grads_close(step_grads, step_grads_ref)
    for logs, logs_ref in zip(trainer.state.log_history, trainer_ref.state.log_history):  # every step's metrics
        assert logs.keys() == logs_ref.keys()
        timings = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
        for key in logs_ref.keys() - timings:
            assert math.isclose(logs[key], logs_ref[key], rel_tol=1e-4, abs_tol=1e-5), key
    assert trainer.state.log_history[1]["clip_ratio/region_mean"] > 0 and trainer.state.log_history[1]["kl"] > 0
    for p, p_ref in zip(trainer.model.parameters(), trainer_ref.model.parameters()):
        torch.testing.assert_close(p, p_ref, atol=1e-5, rtol=1e-4)


# ---- compute_loss level: every option against TRL's _compute_loss on one fixed batch ----

B, P, T = 6, 4, 7


def make_batch(trainer):
    """A left-padded prompt and right-padded completion batch with off-policy old, reference and sampler log-probs."""
    g = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = prompt_mask[3, :1] = 0
    prompt_ids[prompt_mask == 0] = 0
    lengths = torch.tensor([7, 5, 3, 7, 1, 6])
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    completion_ids = torch.randint(3, vocab, (B, T), generator=g).masked_fill(completion_mask == 0, 0)
    with torch.no_grad():
        logps, _, _ = trl.GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), T)

    def near(scale):
        return (logps + scale * torch.randn(B, T, generator=g)) * completion_mask

    tool_mask = (torch.rand(B, T, generator=g) > 0.2).long()
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": near(0.4), "ref_per_token_logps": near(0.3), "sampling_per_token_logps": near(0.2),
        "importance_sampling_ratio": torch.exp(0.3 * torch.randn(B, T, generator=g)),
        "tool_mask": tool_mask, "num_items_in_batch": completion_mask.sum() * 2,
    }


def make_pair(model, tmp_path_factory, **overrides):
    """TRL's trainer and rlfuse's on identical copies of ``model``, plus one batch."""
    kwargs = dict(reward_funcs=reward_len, train_dataset=dataset(), processing_class=make_tokenizer())
    overrides = {"beta": 0.0, **overrides}
    trl_trainer, ours = (cls(copy.deepcopy(model), args=grpo_args(tmp_path_factory.mktemp("out"), **overrides),
                             **kwargs) for cls in (trl.GRPOTrainer, GRPOTrainer))
    return trl_trainer, ours, make_batch(trl_trainer)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    return make_pair(make_model(tie_word_embeddings=False, seed=1), tmp_path_factory)


DEFAULTS = dict(loss_type="dapo", importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28, beta=0.0,
                delta=None, use_bias_correction_kl=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                vllm_is=False, tool_mask=False, on_policy=False, eval=False, entropy_coef=0.0, adaptive=False,
                last_entropy=float("inf"))
ARGS_FIELDS = ("delta", "use_bias_correction_kl")


def run_loss(trainer, compute, batch, monkeypatch, option):
    """Set ``option`` on ``trainer``, run ``compute(trainer, model, inputs)``; return loss, grads, metrics."""
    option = {**DEFAULTS, **option}
    for name in ("loss_type", "importance_sampling_level", "epsilon_low", "epsilon_high", "beta",
                 "top_entropy_quantile", "off_policy_mask_threshold"):
        monkeypatch.setattr(trainer, name, option[name])
    for name in ARGS_FIELDS:
        monkeypatch.setattr(trainer.args, name, option[name])
    monkeypatch.setattr(trainer.args, "steps_per_generation", 2)
    monkeypatch.setattr(trainer, "use_vllm", option["vllm_is"])
    monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", option["vllm_is"])
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 4, raising=False)
    monkeypatch.setattr(trainer, "entropy_coef", option["entropy_coef"])
    monkeypatch.setattr(trainer, "use_adaptive_entropy", option["adaptive"])
    monkeypatch.setattr(trainer, "_entropy_bonus_enabled", option["entropy_coef"] != 0.0 or option["adaptive"])
    monkeypatch.setattr(trainer, "_last_world_entropy", option["last_entropy"])
    monkeypatch.setattr(trainer, "_entropy_window_stats", None)
    inputs = dict(batch)
    if not option["tool_mask"]:
        del inputs["tool_mask"]
    if option["on_policy"]:  # TRL then uses the current log-probs, detached
        del inputs["old_per_token_logps"]
    model = trainer.model
    model.train(not option["eval"])
    model.zero_grad(set_to_none=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    loss = compute(trainer, model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    mode = "eval" if option["eval"] else "train"
    return loss.detach(), grads, {k: v[0] for k, v in trainer._metrics[mode].items()}


@pytest.mark.parametrize("batch_size", [None, 4])
def test_logps_and_entropies_match_trl(trainers, batch_size):
    """Per-token log-probs and entropies, 0 at padding, also when the batch is scored in chunks."""
    trl_trainer, ours, batch = trainers
    args = (torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), T)
    with torch.no_grad():
        ref = trl.GRPOTrainer._get_per_token_logps_and_entropies(trl_trainer, trl_trainer.model, *args,
                                                                 batch_size=batch_size, compute_entropy=True)
        out = ours._get_per_token_logps_and_entropies(ours.model, *args, batch_size=batch_size, compute_entropy=True)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    assert (out[0][batch["completion_mask"] == 0] == 0).all() and out[2] is None


def compare_losses(trainers, monkeypatch, case):
    """Assert rlfuse's _compute_loss gives TRL's loss, gradients and metrics; return TRL's."""
    trl_trainer, ours, batch = trainers
    loss_ref, grads_ref, metrics_ref = run_loss(trl_trainer, trl.GRPOTrainer._compute_loss, batch, monkeypatch, case)
    loss, grads, metrics = run_loss(ours, GRPOTrainer._compute_loss, batch, monkeypatch, case)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-5)
    assert_grads_close(grads, grads_ref)
    assert metrics.keys() == metrics_ref.keys()
    for key in metrics_ref:
        assert math.isclose(metrics[key], metrics_ref[key], rel_tol=1e-5, abs_tol=1e-6) or (
            math.isnan(metrics[key]) and math.isnan(metrics_ref[key])), key
    return loss_ref, grads_ref, metrics_ref


LOSS_CASES = [  # cispo's epsilon_high is the ratio's upper bound, 1.2 clips some of this batch's tokens
    dict(loss_type=loss_type, importance_sampling_level=level, epsilon_high=1.2 if loss_type == "cispo" else 0.28)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
    for level in ("token", "sequence")
]
OPTION_CASES = [
    dict(loss_type="dapo", delta=1.1),
    dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.05),
    dict(loss_type="bnpo", beta=0.05),
    dict(loss_type="dr_grpo", importance_sampling_level="sequence", beta=0.05, use_bias_correction_kl=True),
    dict(loss_type="grpo", top_entropy_quantile=0.3),
    dict(loss_type="dapo", importance_sampling_level="sequence", top_entropy_quantile=0.5),
    dict(loss_type="cispo", epsilon_high=1.2, vllm_is=True),
    dict(loss_type="dapo", off_policy_mask_threshold=0.02),
    dict(loss_type="grpo", tool_mask=True),
    dict(loss_type="bnpo", on_policy=True),
    dict(loss_type="dapo", eval=True),
    dict(loss_type="sapo", beta=0.05, top_entropy_quantile=0.5),
    dict(loss_type="luspo", importance_sampling_level="sequence", delta=1.05, tool_mask=True),
    # the entropy bonus: static; adaptive below its target (applied, coefficient raised) and above it (not applied)
    dict(loss_type="grpo", entropy_coef=0.3),
    dict(loss_type="dapo", entropy_coef=0.3, top_entropy_quantile=0.5, eval=True),
    dict(loss_type="dr_grpo", entropy_coef=0.2, adaptive=True, last_entropy=0.1),
]


LOSS_KEYS = ("loss_type", "importance_sampling_level", "epsilon_low", "epsilon_high")


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items() if not k.startswith("epsilon"))


@pytest.mark.parametrize("case", LOSS_CASES + OPTION_CASES, ids=case_id)
def test_compute_loss_matches_trl(trainers, monkeypatch, case):
    trl_trainer, ours, batch = trainers
    fused = CallCounter(monkeypatch, trl_head, "linear_token_logprobs")
    loss_ref, grads_ref, metrics_ref = compare_losses(trainers, monkeypatch, case)
    assert fused.calls > 0
    extra = {k: v for k, v in case.items() if k not in LOSS_KEYS}
    if extra:  # the option changes TRL's own loss, so an implementation that ignored it would fail above
        base = {k: v for k, v in case.items() if k not in extra}
        loss_base, grads_base, _ = run_loss(trl_trainer, trl.GRPOTrainer._compute_loss, batch, monkeypatch, base)
        changed = abs(float(loss_base - loss_ref)) > 1e-4 or any(
            not torch.allclose(grads_base[n], grads_ref[n], atol=1e-4) for n in grads_ref)
        assert changed, f"{extra} leaves TRL's loss unchanged on this batch; the case tests nothing"


def test_triton_kernel_path_matches_trl(trainers, monkeypatch):
    """The Triton linear log-prob kernels (Triton's interpreter on CPU) inside the trainer."""
    monkeypatch.setenv("RLFUSE_BACKEND", "triton")
    compare_losses(trainers, monkeypatch, dict(loss_type="dapo", beta=0.05, top_entropy_quantile=0.5))


def test_softcapped_logits_fall_back_to_the_logits_kernel(tmp_path_factory, monkeypatch):
    """Gemma 2 soft-caps its logits: the trainer scores the model's own logits with token_logprobs."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(2)
    config = Gemma2Config(vocab_size=len(CHARS) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                          final_logit_softcapping=2.0, sliding_window=16, pad_token_id=0, eos_token_id=1,
                          bos_token_id=None)
    pair = make_pair(Gemma2ForCausalLM(config).float(), tmp_path_factory)
    assert not rlfuse_trl.plain_lm_head(pair[1].model)
    fused = CallCounter(monkeypatch, trl_head, "linear_token_logprobs")
    logits = CallCounter(monkeypatch, trl_head, "token_logprobs")
    compare_losses(pair, monkeypatch, dict(loss_type="grpo", beta=0.05))
    assert fused.calls == 0 and logits.calls > 0


def test_lm_head_cast_to_fp32_matches_trl(tmp_path_factory, monkeypatch):
    pair = make_pair(make_model(seed=4), tmp_path_factory, cast_lm_head_to_fp32=True)
    fused = CallCounter(monkeypatch, trl_head, "linear_token_logprobs")
    compare_losses(pair, monkeypatch, dict(loss_type="bnpo", beta=0.05))
    assert fused.calls > 0


def test_lora_policy_with_reference_matches_trl(model_dir, tmp_path, monkeypatch):
    """A LoRA policy: the reference log-probs come from the same model with the adapter disabled."""
    from peft import LoraConfig

    fused = CallCounter(monkeypatch, trl_head, "linear_token_logprobs")

    def lora():
        return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])

    losses_ref, grads_ref, _ = train(trl.GRPOTrainer, model_dir, tmp_path / "trl", peft_config=lora())
    losses, grads, _ = train(GRPOTrainer, model_dir, tmp_path / "rlfuse", peft_config=lora())
    assert fused.calls > 0
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), atol=1e-5, rtol=1e-5)
    for step_grads, step_grads_ref in zip(grads, grads_ref):
        assert all("lora" in name for name in step_grads)
        assert_grads_close(step_grads, step_grads_ref)


@pytest.mark.parametrize("option, value", [("use_liger_kernel", True)])
def test_unsupported_option_raises_at_construction(model_dir, tmp_path, option, value):
    args = grpo_args(tmp_path, **{option: value})
    with pytest.raises(ValueError, match=option):
        GRPOTrainer(model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_router_aux_loss_matches_trl(tmp_path_factory, monkeypatch, family):
    """A Mixture-of-Experts model with its router's load-balancing loss on (TRL's default when the config has a
    coefficient): the fused path adds the same aux loss, and logs it."""
    import transformers

    torch.manual_seed(3)
    common = dict(vocab_size=len(CHARS) + 3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_experts_per_tok=2, router_aux_loss_coef=0.5, pad_token_id=0,
                  eos_token_id=1, bos_token_id=None)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=64, num_local_experts=4,
                                                                           **common))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            moe_intermediate_size=32, intermediate_size=64, num_experts=4, head_dim=16, **common))
    pair = make_pair(model.float(), tmp_path_factory)
    assert pair[0].aux_loss_enabled and pair[1].aux_loss_enabled
    fused = CallCounter(monkeypatch, trl_head, "linear_token_logprobs")
    _, _, metrics = compare_losses(pair, monkeypatch, dict(loss_type="grpo"))
    assert fused.calls > 0 and metrics["aux_loss"] > 0
    with torch.no_grad():  # the generation step's passes ask for no aux loss, and get None
        assert pair[1]._get_per_token_logps_and_entropies(
            pair[1].model, torch.cat([pair[2]["prompt_ids"], pair[2]["completion_ids"]], 1),
            torch.cat([pair[2]["prompt_mask"], pair[2]["completion_mask"]], 1), T)[2] is None


def test_adaptive_entropy_above_target_applies_no_bonus_and_lowers_the_coefficient(trainers, monkeypatch):
    """The previous step's entropy is above entropy_target: no bonus this step; this step's entropy (the tiny
    random model's, far above 0.2 nats) moves the coefficient down, as in TRL."""
    trl_trainer, ours, batch = trainers
    case = dict(loss_type="bnpo", entropy_coef=0.2, adaptive=True, last_entropy=0.5)
    _, _, metrics = compare_losses(trainers, monkeypatch, case)
    assert math.isclose(metrics["entropy_coef"], 0.2 - trl_trainer.args.entropy_coef_delta)
    assert ours.entropy_coef == trl_trainer.entropy_coef < 0.2
    plain = run_loss(ours, GRPOTrainer._compute_loss, batch, monkeypatch, dict(loss_type="bnpo"))
    bonus = run_loss(ours, GRPOTrainer._compute_loss, batch, monkeypatch, case)
    torch.testing.assert_close(bonus[0], plain[0])


def test_adaptive_entropy_window_spans_the_accumulation_steps(trainers, monkeypatch):
    """The adaptive controller measures the whole accumulation window, then moves the coefficient once."""
    trl_trainer, ours, batch = trainers
    states = []
    for trainer, compute in ((trl_trainer, trl.GRPOTrainer._compute_loss), (ours, GRPOTrainer._compute_loss)):
        option = dict(loss_type="grpo", entropy_coef=0.2, adaptive=True, last_entropy=0.1)
        monkeypatch.setattr(trainer.args, "entropy_target", 10.0)  # above the tiny model's entropy: raise c
        gradient_state = trainer.accelerator.gradient_state
        gradient_state._set_sync_gradients(False)
        try:
            first = run_loss(trainer, compute, batch, monkeypatch, option)
            mid = (trainer.entropy_coef, trainer._entropy_window_stats.clone())
            monkeypatch.setattr(trainer, "_last_world_entropy", 0.1)
        finally:
            gradient_state._set_sync_gradients(True)
        window = trainer._entropy_window_stats
        loss = compute(trainer, trainer.model, {k: v for k, v in batch.items() if k != "tool_mask"})
        states.append((first[0], mid, loss.detach(), trainer.entropy_coef, trainer._last_world_entropy, window))
    (loss1_ref, mid_ref, loss2_ref, coef_ref, last_ref, _), (loss1, mid, loss2, coef, last, _) = states
    torch.testing.assert_close(loss1, loss1_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss2, loss2_ref, atol=1e-6, rtol=1e-5)
    assert mid[0] == mid_ref[0] == 0.2  # no optimizer step yet: unchanged
    torch.testing.assert_close(mid[1], mid_ref[1])
    assert coef == coef_ref and coef > 0.2 and math.isclose(last, last_ref, rel_tol=1e-6)
    assert ours._entropy_window_stats is None


def test_fallback_computes_trl_s_own_way(trainers, monkeypatch):
    """Where rlfuse's path does not serve a run (a vision-language model), TRL's own computation runs instead."""
    trl_trainer, ours, batch = trainers
    monkeypatch.setattr(ours, "_trl_fallback", "a test")
    fused = CallCounter(monkeypatch, trl_head, "linear_token_logprobs")
    compare_losses(trainers, monkeypatch, dict(loss_type="sapo", entropy_coef=0.1))
    assert fused.calls == 0


def test_import_rlfuse_never_needs_trl():
    import subprocess
    import sys

    code = "import sys; sys.modules['trl'] = None; import rlfuse, rlfuse.integrations; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


class HalvedLogitsLlama(LlamaForCausalLM):
    """A model that rescales its logits in its own forward, which no config field announces."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_unannounced_logit_transform_falls_back_to_the_logits_kernel(tmp_path, monkeypatch):
    torch.manual_seed(3)
    model = HalvedLogitsLlama(make_model().config)
    assert rlfuse_trl.plain_lm_head(model) and not rlfuse_trl.head_reproduces_logits(model)
    trainer = GRPOTrainer(model, reward_funcs=reward_len, args=grpo_args(tmp_path, beta=0.0),
                          train_dataset=dataset(), processing_class=make_tokenizer())
    fused = CallCounter(monkeypatch, trl_head, "linear_token_logprobs")
    ids = torch.randint(3, model.config.vocab_size, (3, 9))
    attention_mask = torch.ones_like(ids)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention_mask, 4)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -5:-1] / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, -4:, None]).squeeze(-1)
    assert fused.calls == 0
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
