"""verl's actor engine with the rlfuse backend: the old-log-prob pass, then one update with rlfuse_grpo, rlfuse_topr
and rlfuse_rover, against a float64 oracle written from materialized logits.

What runs is verl 0.9.1's own code for one data-parallel rank: ``FSDPEngineWithLMHead.forward_backward_batch``
(micro-batching, the global token count all-reduced over a single-process gloo group), ``prepare_model_inputs``
(packing, rolled labels, ``shift_labels``), the model forward that verl's ``apply_monkey_patch`` installs,
``prepare_model_outputs`` and ``verl.workers.utils.losses.ppo_loss``, with rlfuse's wrappers around the last two
and verl's ``no_padding_2_padding`` as the trainer uses it.

What does not run on the CPU, and why:

- verl 0.9 has no ``DataParallelPPOActor`` any more; its actor is ``verl.workers.engine_workers.ActorRolloutRefWorker``
  over a training engine. Importing ``engine_workers`` needs ``uvicorn`` (not installed); the trainers'
  modules need more: ``verl.trainer.ppo.ray_trainer`` (legacy) ``torchdata``, ``cachetools``, ``uvicorn``,
  ``fastapi``, ``opentelemetry``, and ``verl.trainer.ppo.v1.trainer_base`` (the default) also
  ``transfer_queue``. So the two old-log-prob wrappers run on stand-ins with verl's contract: the legacy
  trainer's worker-group output padded by ``no_padding_2_padding``, and the V1 trainer's TransferQueue calls
  ``kv_batch_get``/``kv_batch_put`` over jagged fields.
- ``FSDPEngine.__init__`` cannot build on a CPU: verl has no CPU platform (``verl.utils.device.get_device_name()``
  falls back to ``"cuda"``), so ``create_device_mesh`` calls ``init_device_mesh("cuda")`` and
  ``torch.cuda.set_device`` fails; with that patched, ``initialize`` fails in verl's memory logging at
  ``torch.cuda.mem_get_info``, and ``apply_monkey_patch`` imports ``AutoModelForCausalLMWithValueHead``, which
  TRL >= 1.0 no longer has. The engine here is therefore verl's class with ``__init__`` replaced: the model is
  not FSDP-wrapped, the device name is ``device``, autocast is off (float32), and the optimizer step is plain SGD.
"""

from __future__ import annotations

import copy
import sys
import types
from functools import partial

import pytest
import torch

transformer_impl = pytest.importorskip("verl.workers.engine.fsdp.transformer_impl")

import rlfuse.integrations.verl as rv  # noqa: E402
from rlfuse.algos import policy_loss  # noqa: E402
from rlfuse.integrations import verl_actor, verl_backend  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.models.transformers import monkey_patch  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402
from verl.workers.utils import losses  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

VOCAB, PROMPT, RESPONSE, TEMPERATURE = 89, 5, 7, 0.8
PROMPT_LENS, RESPONSE_LENS = [5, 3, 4, 2], [7, 4, 1, 6]  # left-padded prompts, right-padded responses


class CPUEngine(transformer_impl.FSDPEngineWithLMHead):
    """verl's engine for the actor's language model, built around an unwrapped model (see the module docstring)."""

    def __init__(self, module):  # noqa: super().__init__ would build a CUDA device mesh
        self.module = module
        self.use_ulysses_sp, self.ulysses_sequence_parallel_size, self.ulysses_device_mesh = False, 1, None
        self.pad_to_length = False
        self._autocast_dtype = torch.float32
        self.engine_config = transformer_impl.FSDPEngineConfig(strategy="fsdp2")


@pytest.fixture(scope="module")
def gloo_group():
    """A single-process gloo group, for the all-reduce of the global token count."""
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    if created:
        torch.distributed.destroy_process_group()


@pytest.fixture
def engine(monkeypatch, device, gloo_group):
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: device)
    monkeypatch.setattr(transformer_impl, "get_device_name", lambda: device.type)
    monkeypatch.setattr(monkey_patch, "is_trl_available", lambda: False)  # no value-head model in TRL >= 1.0
    monkeypatch.setattr(Qwen2ForCausalLM, "forward", Qwen2ForCausalLM.forward)
    rv.register()
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         attn_implementation="eager")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    monkey_patch.apply_monkey_patch(model, use_remove_padding=True, use_fused_kernels=True,
                                    fused_kernels_backend="rlfuse")
    return CPUEngine(model)


def padded_batch(device, use_remove_padding=True):
    """The trainer's batch before the actor: left-padded prompts then right-padded responses, (B, P + R)."""
    g = torch.Generator().manual_seed(11)
    B = len(PROMPT_LENS)
    prompts = torch.randint(0, VOCAB, (B, PROMPT), generator=g)
    responses = torch.randint(0, VOCAB, (B, RESPONSE), generator=g)
    prompt_mask = torch.arange(PROMPT).flip(0) < torch.tensor(PROMPT_LENS)[:, None]
    response_mask = torch.arange(RESPONSE) < torch.tensor(RESPONSE_LENS)[:, None]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = TensorDict({
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": response_mask.long(),
        "advantages": torch.randn(B, RESPONSE, generator=g) * response_mask,
    }, batch_size=[B]).to(device)
    tu.assign_non_tensor(batch, temperature=TEMPERATURE, use_remove_padding=use_remove_padding,
                         use_fused_kernels=True, use_dynamic_bsz=False, micro_batch_size_per_gpu=2, global_batch_size=B)
    return batch


def old_log_prob_pass(engine, batch):
    """The actor's old-log-prob pass through rlfuse's trainer wrapper; returns the batch for the update."""
    class WorkerGroup:
        def compute_log_prob(self, batch_td):
            tu.assign_non_tensor(batch_td, calculate_entropy=True, compute_loss=False)
            return tu.get_tensordict(engine.forward_backward_batch(batch_td, None, forward_only=True)["model_output"])

    class Trainer:  # RayPPOTrainer._compute_old_log_prob's contract (verl's module cannot be imported here)
        actor_rollout_wg = WorkerGroup()

        def _compute_old_log_prob(self, batch):
            batch_td = left_right_2_no_padding(batch.to_tensordict())
            output = self.actor_rollout_wg.compute_log_prob(batch_td)
            old = no_padding_2_padding(tu.get(output, "log_probs"), batch_td).float()
            return DataProto.from_tensordict(tu.get_tensordict({"old_log_probs": old})), 0.0

    trainer = Trainer()
    wrapped = verl_actor.wrap_compute_old_log_prob(Trainer._compute_old_log_prob)
    old, _ = wrapped(trainer, DataProto.from_tensordict(batch.clone()))
    assert trainer.actor_rollout_wg.compute_log_prob.__name__ == "compute_log_prob"  # put back afterwards
    update = batch.clone()
    update["old_log_probs"] = old.batch["old_log_probs"]
    update["old_vocab_mean"] = old.batch["old_vocab_mean"]
    return left_right_2_no_padding(update)


def oracle(model, batch):
    """A float64 copy of ``model`` and, from its materialized logits on each unpadded sequence, the response
    tokens' log-probs and the vocabulary means of log_softmax(logits / T), (B, R) with 0 at padding."""
    model = copy.deepcopy(model).double()
    model.zero_grad(set_to_none=True)
    rows_logp, rows_vm = [], []
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids = torch.cat([batch["prompts"][i, PROMPT - p:], batch["responses"][i, :r]]).unsqueeze(0)
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        logp = torch.log_softmax(model.lm_head(hidden) / TEMPERATURE, dim=-1)[p - 1: p + r - 1]
        rows_logp.append(torch.nn.functional.pad(logp.gather(-1, ids[0, p:, None])[:, 0], (0, RESPONSE - r)))
        rows_vm.append(torch.nn.functional.pad(logp.mean(-1), (0, RESPONSE - r)))
    logps, vmeans = torch.stack(rows_logp), torch.stack(rows_vm)
    return model, logps, vmeans


@pytest.mark.parametrize("loss_mode, use_remove_padding", [
    ("rlfuse_grpo", True), ("rlfuse_topr", True), ("rlfuse_rover", True), ("rlfuse_rover", False),
])
def test_old_log_prob_pass_then_one_update(engine, loss_mode, use_remove_padding, device, monkeypatch):
    calls = []
    kernel = verl_backend.linear_token_logprobs
    monkeypatch.setattr(verl_backend, "linear_token_logprobs", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    batch = padded_batch(device, use_remove_padding)
    update = old_log_prob_pass(engine, batch)
    assert len(calls) == 2  # two micro-batches of two sequences, both through rlfuse's kernel

    _, old_logps, old_vmeans = oracle(engine.module, batch)
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(torch.where(mask, update["old_log_probs"], 0.0).double(), old_logps, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(torch.where(mask, update["old_vocab_mean"], 0.0).double(), old_vmeans, rtol=1e-5,
                               atol=1e-5)

    with torch.no_grad():  # the update's policy differs from the one that sampled the batch
        for p in engine.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode="token-mean",
                         entropy_coeff=0.0, use_kl_loss=False, clip_ratio=0.2, clip_ratio_c=3.0,
                         policy_loss=PolicyLossConfig(loss_mode=loss_mode))
    tu.assign_non_tensor(update, calculate_entropy=True)
    engine.module.zero_grad(set_to_none=True)
    out = engine.forward_backward_batch(update, partial(losses.ppo_loss, config=config), forward_only=False)
    assert len(calls) == 4
    loss = sum(out["loss"])

    model, logps, vmeans = oracle(engine.module, batch)
    cfg = rv.rlfuse_config_from_verl(loss_mode.removeprefix("rlfuse_"), config, "token-mean")
    extra = {"vocab_mean": vmeans, "old_vocab_mean": old_vmeans} if loss_mode == "rlfuse_rover" else {}
    ref, _ = policy_loss(logps, old_logps, batch["advantages"].double(), mask, config=cfg, **extra)
    ref.backward()
    assert abs(ref.item()) > 1e-3
    assert loss == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    ref_grads = dict(model.named_parameters())
    for name, param in engine.module.named_parameters():
        expected = ref_grads[name].grad
        scale = float(expected.abs().max())
        torch.testing.assert_close(param.grad.double(), expected, rtol=1e-3, atol=1e-4 * scale, msg=name)

    before = [p.detach().clone() for p in engine.module.parameters()]
    torch.optim.SGD(engine.module.parameters(), lr=1e-2).step()  # the update itself
    assert any(not torch.equal(b, p) for b, p in zip(before, engine.module.parameters()))


def test_rover_without_the_backend_or_old_means_raises(engine, device):
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2,
                         policy_loss=PolicyLossConfig(loss_mode="rlfuse_rover"))
    batch = padded_batch(device)
    update = left_right_2_no_padding(batch.clone())
    update["old_log_probs"] = torch.zeros(len(PROMPT_LENS), RESPONSE, device=device)
    with pytest.raises(ValueError, match="old_vocab_mean in the batch.*VERL_USE_EXTERNAL_MODULES"):
        losses.ppo_loss(config, {"log_probs": None, "vocab_mean": torch.zeros(1)}, update)
    with pytest.raises(ValueError, match="impl_backend=rlfuse"):
        losses.ppo_loss(config, {"log_probs": None}, update)


def test_install_is_idempotent_and_other_losses_get_verls():
    rv.register()
    rv.register()
    wrapper = losses.ppo_loss
    assert wrapper.rlfuse_original.__module__ == "verl.workers.utils.losses"
    assert getattr(wrapper.rlfuse_original, "rlfuse_original", None) is None
    prepare = transformer_impl.FSDPEngineWithLMHead.prepare_model_outputs
    assert getattr(prepare.rlfuse_original, "rlfuse_original", None) is None


class FakeTransferQueue(types.ModuleType):
    """``transfer_queue``'s two calls the V1 trainer makes, over a dict of fields (the package is not installed)."""

    def __init__(self, fields):
        super().__init__("transfer_queue")
        self.fields = fields

    def kv_batch_get(self, keys, partition_id, select_fields):
        return TensorDict({name: self.fields[name] for name in select_fields}, batch_size=[len(keys)])

    def kv_batch_put(self, keys, partition_id, fields):
        self.fields.update(fields.items())
        return types.SimpleNamespace(keys=keys, partition_id=partition_id)


def test_v1_trainer_stores_the_same_old_vocab_mean(engine, device, monkeypatch):
    """verl's default trainer keeps the batch in a TransferQueue as jagged tensors: the wrapper cuts the responses
    out of the worker's ``vocab_mean`` and equals the legacy trainer's padded ``old_vocab_mean``."""
    batch = padded_batch(device)
    legacy = old_log_prob_pass(engine, batch)
    td = left_right_2_no_padding(batch.clone())
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    vocab_mean = engine.forward_backward_batch(td, None, forward_only=True)["model_output"]["vocab_mean"]
    response_mask = torch.nested.as_nested_tensor(
        [row[:n] for row, n in zip(batch["response_mask"], RESPONSE_LENS)], layout=torch.jagged)
    queue = FakeTransferQueue({"vocab_mean": vocab_mean, "response_mask": response_mask})
    monkeypatch.setitem(sys.modules, "transfer_queue", queue)

    def trainer(loss_mode, bypass=False):
        config = OmegaConf.create({"actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": loss_mode}}},
                                   "algorithm": {"rollout_correction": {"bypass_mode": bypass}}})
        return types.SimpleNamespace(config=config)

    wrapped = verl_actor.wrap_v1_compute_old_log_prob(lambda self, batch, metrics: batch)
    meta = types.SimpleNamespace(keys=[f"k{i}" for i in range(len(PROMPT_LENS))], partition_id="train")
    assert wrapped(trainer("rlfuse_grpo"), meta, {}) is meta and "old_vocab_mean" not in queue.fields
    wrapped(trainer("rlfuse_rover"), meta, {})
    stored = queue.fields["old_vocab_mean"].to_padded_tensor(0.0, output_size=(len(PROMPT_LENS), RESPONSE))
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(stored, torch.where(mask, legacy["old_vocab_mean"], 0.0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="bypass_mode"):
        wrapped(trainer("rlfuse_rover", bypass=True), meta, {})
