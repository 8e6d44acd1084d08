"""ROVER inside verl's actor (verl 0.9): the vocabulary means V̄ from the rlfuse backend reach ``rlfuse_rover``.

ROVER ("Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards") needs, at every response
position, V̄ = mean_v log_softmax(logits / T)_v under the current policy and under the policy that sampled
the batch. verl 0.9's actor is ``verl.workers.engine_workers.ActorRolloutRefWorker`` on a training engine
(``FSDPEngineWithLMHead``); its loss is ``verl.workers.utils.losses.ppo_loss``. Three wrappers, installed
from the loaded modules by :func:`install_actor` (verl's files are not edited), carry V̄ through it:

1. engine: ``FSDPEngineWithLMHead.prepare_model_outputs`` also returns ``vocab_mean`` (jagged like
   ``log_probs``) when the forward is the rlfuse backend's (:mod:`rlfuse.integrations.verl_backend`);
2. trainer: the old-log-prob pass stores it in the batch as ``old_vocab_mean``: the V1 trainer's
   ``PPOTrainer._compute_old_log_prob`` (verl's default, ``trainer.use_v1=True``) in the TransferQueue, the
   legacy ``RayPPOTrainer._compute_old_log_prob`` as a (B, response_length) float32 tensor;
3. loss: when ``actor.policy_loss.loss_mode=rlfuse_rover``, ``ppo_loss`` pads the current ``vocab_mean`` to
   the response and passes both means to :func:`rlfuse.integrations.verl.rlfuse_rover` through
   :data:`rlfuse.integrations.verl_actor.VOCAB_MEANS`; every other loss mode gets verl's ``ppo_loss`` unchanged.

Each wrapper is selected by configuration: without the rlfuse backend no ``vocab_mean`` exists, and without
``rlfuse_rover`` the loss is verl's.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import sys

import torch

ROVER_LOSS_MODE = "rlfuse_rover"
# (vocab_mean, old_vocab_mean), each (B, T) float32, set by ppo_loss below around verl's call of rlfuse_rover
# (rlfuse.integrations.verl), whose registry signature has no place for them.
VOCAB_MEANS: contextvars.ContextVar = contextvars.ContextVar("rlfuse_verl_vocab_means", default=None)


def _mark(wrapper, original):
    wrapper.rlfuse_original = original
    return wrapper


def _wrapped(fn) -> bool:
    return getattr(fn, "rlfuse_original", None) is not None


def _fused_vocab_mean(engine, output, output_args, micro_batch):
    """``output.vocab_mean`` as verl arranges ``log_probs``: jagged (bsz, j1) by the micro-batch's offsets."""
    from verl.utils import tensordict_utils as tu

    input_ids = micro_batch["input_ids"]
    cu_seqlens = input_ids.offsets()
    vocab_mean = output.vocab_mean
    if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        values = engine._gather_and_unpad_packed(vocab_mean.squeeze(0), output_args["pad_size"])
    else:  # dense (bsz, seqlen): keep each sequence's own tokens, as verl does for log_probs
        lengths = cu_seqlens.diff()
        keep = torch.arange(vocab_mean.shape[1], device=vocab_mean.device) < lengths.unsqueeze(1)
        values = vocab_mean[keep]
    return torch.nested.nested_tensor_from_jagged(values, cu_seqlens)


def wrap_prepare_model_outputs(original):
    """``prepare_model_outputs`` that adds ``model_output["vocab_mean"]`` when the forward returned one."""

    @functools.wraps(original)
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        model_output = original(self, output, output_args, micro_batch, logits_processor_func)
        if getattr(output, "vocab_mean", None) is not None:
            model_output["vocab_mean"] = _fused_vocab_mean(self, output, output_args, micro_batch)
        return model_output

    return _mark(prepare_model_outputs, original)


def wrap_compute_old_log_prob(original):
    """``RayPPOTrainer._compute_old_log_prob`` that also stores the worker's ``vocab_mean`` as ``old_vocab_mean``.

    The worker group's ``compute_log_prob`` is intercepted for the duration of the call to read the output
    verl's own function discards; the result holds ``old_vocab_mean`` (B, response_length) float32 when the
    actor runs the rlfuse backend, and is verl's otherwise.
    """

    @functools.wraps(original)
    def _compute_old_log_prob(self, batch):
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import no_padding_2_padding

        worker_group = self.actor_rollout_wg
        compute_log_prob = worker_group.compute_log_prob
        seen = {}

        def capture(batch_td, *args, **kwargs):
            output = compute_log_prob(batch_td, *args, **kwargs)
            seen.update(batch_td=batch_td, output=output)
            return output

        worker_group.compute_log_prob = capture
        try:
            old_log_prob, mfu = original(self, batch)
        finally:
            worker_group.compute_log_prob = compute_log_prob
        vocab_mean = tu.get(seen["output"], "vocab_mean") if seen else None
        if vocab_mean is not None:
            padded = no_padding_2_padding(vocab_mean, seen["batch_td"]).float()
            old_log_prob.batch["old_vocab_mean"] = padded
        return old_log_prob, mfu

    return _mark(_compute_old_log_prob, original)


def wrap_v1_compute_old_log_prob(original):
    """The V1 trainer's ``PPOTrainer._compute_old_log_prob(batch, metrics)`` (``trainer.use_v1=True``, verl's
    default), which also writes ``old_vocab_mean`` (jagged, response tokens) to the TransferQueue when
    ``actor.policy_loss.loss_mode=rlfuse_rover``.

    The worker's old-log-prob pass writes every model output, ``vocab_mean`` included, to the TransferQueue;
    this cuts the response part out with verl's ``response_from_nested``, as verl does for ``old_log_probs``.
    Bypass mode (old log-probs taken from the rollout) computes no vocabulary means and raises.

    Raises:
        ValueError: ``rlfuse_rover`` with the old-log-prob pass bypassed.
    """

    @functools.wraps(original)
    def _compute_old_log_prob(self, batch, metrics):
        batch = original(self, batch, metrics)
        if self.config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla") != ROVER_LOSS_MODE:
            return batch
        import transfer_queue as tq
        from verl.workers.utils.padding import response_from_nested

        rollout_correction = self.config.algorithm.get("rollout_correction", None)
        if rollout_correction and rollout_correction.get("bypass_mode", False):
            raise ValueError("loss_mode=rlfuse_rover needs the old policy's vocabulary means, which bypass_mode skips; "
                             "set algorithm.rollout_correction.bypass_mode=False")
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["vocab_mean", "response_mask"])
        data["old_vocab_mean"] = response_from_nested(data.pop("vocab_mean"), data["response_mask"])
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=data.select("old_vocab_mean"))

    return _mark(_compute_old_log_prob, original)


def wrap_ppo_loss(original):
    """verl's ``ppo_loss(config, model_output, data, dp_group)``, giving ``rlfuse_rover`` its vocabulary means.

    For ``config.policy_loss.loss_mode == "rlfuse_rover"`` it pads ``model_output["vocab_mean"]`` to the
    response (B, R) as verl pads ``log_probs``, reads ``data["old_vocab_mean"]`` (B, R), and runs verl's
    ``ppo_loss`` with both set in :data:`rlfuse.integrations.verl_actor.VOCAB_MEANS`; other modes call verl's.

    Raises:
        ValueError: ``rlfuse_rover`` without the rlfuse backend's ``vocab_mean``, or a batch without
            ``old_vocab_mean``, each naming the setting that provides it.
    """

    @functools.wraps(original)
    def ppo_loss(config, model_output, data, dp_group=None):
        if config.policy_loss.get("loss_mode", "vanilla") != ROVER_LOSS_MODE:
            return original(config, model_output, data, dp_group)
        from verl.workers.utils.padding import no_padding_2_padding

        if model_output.get("vocab_mean") is None:
            raise ValueError(
                "loss_mode=rlfuse_rover needs the vocabulary means of the rlfuse backend; set "
                "actor_rollout_ref.model.use_fused_kernels=True and "
                "actor_rollout_ref.model.fused_kernel_options.impl_backend=rlfuse"
            )
        if "old_vocab_mean" not in data.keys():
            raise ValueError(
                "loss_mode=rlfuse_rover needs old_vocab_mean in the batch, stored by the trainer's old-log-prob "
                "pass when rlfuse.integrations.verl is loaded in the trainer process: set "
                "VERL_USE_EXTERNAL_MODULES=rlfuse.integrations.verl, and do not bypass the old-log-prob pass"
            )
        vocab_mean = no_padding_2_padding(model_output["vocab_mean"], data)
        old_vocab_mean = data.select("old_vocab_mean").to_padded_tensor()["old_vocab_mean"]
        token = VOCAB_MEANS.set((vocab_mean, old_vocab_mean.to(vocab_mean)))
        try:
            return original(config, model_output, data, dp_group)
        finally:
            VOCAB_MEANS.reset(token)

    return _mark(ppo_loss, original)


def _patch(owner, name: str, wrap) -> None:
    current = getattr(owner, name)
    if not _wrapped(current):
        setattr(owner, name, wrap(current))


def install_actor() -> None:
    """Install the three wrappers into whichever of verl's modules can be imported; idempotent.

    The engine and the loss are patched where the worker looks them up (``FSDPEngineWithLMHead``,
    ``verl.workers.utils.losses.ppo_loss`` and, when loaded, ``verl.workers.engine_workers.ppo_loss``); the
    trainers in ``verl.trainer.ppo.v1.trainer_base.PPOTrainer`` and ``verl.trainer.ppo.ray_trainer.RayPPOTrainer``.
    A module that cannot be imported (a partial verl install) is skipped.
    """
    from verl.workers.utils import losses

    _patch(losses, "ppo_loss", wrap_ppo_loss)
    workers = sys.modules.get("verl.workers.engine_workers")
    if workers is not None:
        workers.ppo_loss = losses.ppo_loss
    for module_name, owner_name, method, wrap in (
        ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead", "prepare_model_outputs",
         wrap_prepare_model_outputs),
        ("verl.trainer.ppo.ray_trainer", "RayPPOTrainer", "_compute_old_log_prob", wrap_compute_old_log_prob),
        ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer", "_compute_old_log_prob", wrap_v1_compute_old_log_prob),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        _patch(getattr(module, owner_name), method, wrap)
