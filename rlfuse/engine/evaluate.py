"""``rlfuse eval``: greedy pass@1, sampled pass@k, answer diversity, format and truncation rates of a model.

One evaluation decodes every problem once greedily (pass@1) and, when asked, ``num_samples`` times at a
temperature through the engine's sampler, from which pass@k follows by the unbiased estimator of "Evaluating
Large Language Models Trained on Code" (:mod:`rlfuse.engine.passk`). Diversity is the mean number of distinct
final answers among a problem's samples. pass@k and diversity show whether a policy keeps several paths to
an answer, which is what ROVER and TOPR claim to preserve.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from rlfuse.engine.data import Example, build_prompt, load_examples
from rlfuse.engine.passk import default_ks, mean_pass_at_k
from rlfuse.engine.precision import MixedPrecision, autocast, resolve_autocast_dtype
from rlfuse.engine.rewards import answer_key, score, solved
from rlfuse.engine.rollout import batch_truncated


@dataclass
class EvalArgs:
    """Evaluate a model or a training checkpoint on a test split: pass@1 (greedy), pass@k, diversity."""

    model: str = "smollm2-135m"
    """A model (local HF folder, hub id, .gguf file, alias smollm2-135m), a checkpoint folder written by
    'rlfuse train', or a run folder (its checkpoint/ is used)."""
    base_model: Optional[str] = None
    """For a LoRA checkpoint (adapters only): the base model (default: the one its run was trained from)."""
    data: str = "svamp"
    """Problems: gsm8k, svamp, or a GSM8K-format JSONL."""
    split: str = "test"
    """Split of a named data set (ignored for a JSONL path)."""
    num_problems: int = 0
    """Evaluate the first N problems (0: all)."""
    num_samples: int = 8
    """n: sampled completions per problem for pass@k and diversity (0: greedy pass@1 only)."""
    ks: Tuple[int, ...] = ()
    """The k of pass@k, each in [1, n] (default: 1, 2, 4, ... up to n)."""
    temperature: float = 0.7
    """Sampling temperature of the n samples."""
    max_new_tokens: int = 256
    """Completion length limit, in tokens; completions cut there count as truncated and wrong."""
    batch_size: int = 8
    """Problems decoded together (each with its n samples)."""
    prompt_style: Literal["zero_shot", "one_shot"] = "one_shot"
    """The prompt, as 'rlfuse train --prompt-style' (evaluate a model with the prompt it was trained with)."""
    stop_after_answer: bool = True
    """End each completion at the newline after its '#### <number>' line, as `rlfuse train` does by default
    (evaluate a model with the stop rule it was trained with)."""
    seed: int = 0
    """Seed of the sampling."""
    output: Optional[str] = None
    """JSON file to write (default: runs/eval-<data>-<split>-<time>.json)."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype: auto is float32 on the CPU, bfloat16 on a GPU."""
    mixed_precision: MixedPrecision = "auto"
    """bf16: matmuls in bfloat16 under torch.autocast; auto: bf16 on a CPU with AVX512-BF16 or AMX when the
    weights are float32, none on a GPU; no: every op in the weights' dtype (as 'rlfuse train')."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option for values that cannot run."""
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_problems < 0 or self.num_samples < 0:
            raise ValueError("--num-problems and --num-samples must be >= 0 (0: all problems; greedy only)")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        bad = [k for k in self.ks if not 1 <= k <= self.num_samples]
        if bad:
            raise ValueError(f"--ks {bad}: each k must be in [1, --num-samples] = [1, {self.num_samples}]")


def _decode(rollout, tokenizer, examples: Sequence[Example], num_generations: int, max_new_tokens: int,
            temperature: float, greedy: bool, batch_size: int, prompt_style: str):
    """(texts, lengths, truncated), one entry per completion, problems in order and each one's samples together."""
    texts: List[str] = []
    lengths: List[int] = []
    truncated: List[bool] = []
    desc = "eval greedy" if greedy else f"eval {num_generations} samples"
    for offset in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
        chunk = examples[offset: offset + batch_size]
        prompts = [build_prompt(tokenizer, ex.question, prompt_style) for ex in chunk]
        batch = rollout.generate(prompts, num_generations, max_new_tokens, temperature, greedy=greedy)
        texts += tokenizer.batch_decode(batch.completion_ids, skip_special_tokens=True)
        lengths += batch.completion_mask.sum(1).tolist()
        truncated += batch_truncated(batch, rollout.stop_ids).tolist()
    return texts, lengths, truncated


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values)


def _rates(texts, lengths, truncated, examples) -> Tuple[List[bool], List[bool], Dict[str, float]]:
    """(answer-only correct, paid, rates) of completions of ``examples`` (one per completion), under
    :func:`rlfuse.engine.rewards.score`: the rule training pays by."""
    scored = score(texts, examples, truncated=truncated)
    correct = solved(scored.correct, truncated)  # a truncated completion counts as wrong, as in training
    paid = solved(scored.derived, truncated)
    return correct, paid, {"accuracy": _mean(correct), "derived_accuracy": _mean(paid),
                           "format_rate": _mean(scored.formatted), "truncated_rate": _mean(truncated),
                           "completion_len_mean": _mean(lengths)}


def majority_baseline(golds: Sequence[str]) -> float:
    """The accuracy of one constant answer for every problem, the most common gold answer: what a policy
    that ignores the question can reach (on SVAMP's test split, ``2`` is right 27 times in 300)."""
    return Counter(golds).most_common(1)[0][1] / len(golds)


def answer_concentration(answers: Sequence[Optional[str]]) -> Tuple[Optional[str], float]:
    """The most frequent answer of ``answers`` (one per problem, None where there is none) and the share of
    problems that got it: near 1 when a policy prints the same answer whatever the question."""
    given = Counter(answer for answer in answers if answer is not None)
    if not given:
        return None, 0.0
    answer, count = given.most_common(1)[0]
    return answer, count / len(answers)


def evaluate_examples(rollout, tokenizer, examples: Sequence[Example], num_samples: int = 0,
                      ks: Sequence[int] = (), max_new_tokens: int = 256, temperature: float = 0.7,
                      batch_size: int = 8, seed: int = 0, prompt_style: str = "zero_shot") -> Dict[str, object]:
    """Evaluate a model, through its ``rollout`` (a :class:`rlfuse.engine.rollout.Rollout` with ``stop_ids``),
    on ``examples``.

    Returns a dict:
        - ``pass@1``: greedy accuracy, answer only.
        - ``greedy``: its ``derived_accuracy`` (the paid rule of :func:`rlfuse.engine.rewards.score`: correct
          and derived, by the gold equation where the data gives one), ``format_rate``, ``truncated_rate``,
          ``completion_len_mean`` (tokens) and ``top_answer_share`` (:func:`answer_concentration`).
        - ``top_answer``: the most frequent greedy answer.
        - ``majority_baseline``: :func:`majority_baseline`; compare pass@1 with it, since a policy can beat a
          weak base model by guessing one number.
        - with ``num_samples`` n > 0 also ``pass@k`` (``{str(k): value}`` from the n samples, ``ks`` defaulting
          to 1, 2, 4, ... n, answer only), ``pass@k_paid`` (the same under the paid rule), ``diversity`` (mean
          number of distinct final answers per problem; a problem whose samples give no answer counts 0) and
          ``sampled`` (the rates of the samples).

    The sampling draws from its own generator seeded by ``seed``: the caller's random state is left as it was.
    ``prompt_style`` is :func:`rlfuse.engine.data.build_prompt`'s.

    ``problems`` lists one record per problem, in order, for paired comparisons of two models on the same
    problems: ``gold``, ``greedy_correct`` (bool), ``greedy_paid`` (bool), ``greedy_answer`` (:func:`rlfuse.engine.rewards.answer_key`,
    None without one), ``greedy_truncated`` and ``greedy_completion``; with samples also ``sampled_correct``
    (how many of the n were correct), ``sampled_paid`` (how many were paid) and ``sampled_answers`` (their
    answer keys).

    Raises:
        ValueError: no examples, or a k outside [1, n].
    """
    if not examples:
        raise ValueError("no problems to evaluate; pass at least one")
    golds = [ex.gold for ex in examples]
    greedy = _decode(rollout, tokenizer, examples, 1, max_new_tokens, 1.0, True, batch_size, prompt_style)
    greedy_correct, greedy_paid, greedy_rates = _rates(*greedy, examples)
    problems = [{"gold": gold, "greedy_correct": ok, "greedy_paid": paid, "greedy_answer": answer_key(text),
                 "greedy_truncated": cut, "greedy_completion": text}
                for gold, ok, paid, text, cut in zip(golds, greedy_correct, greedy_paid, greedy[0], greedy[2])]
    top_answer, greedy_rates["top_answer_share"] = answer_concentration([p["greedy_answer"] for p in problems])
    result: Dict[str, object] = {"num_problems": len(examples), "pass@1": _mean(greedy_correct),
                                 "majority_baseline": majority_baseline(golds), "top_answer": top_answer,
                                 "greedy": greedy_rates, "problems": problems}
    if not num_samples:
        return result
    ks = list(ks) or default_ks(num_samples)
    device = next(rollout.model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        texts, lengths, truncated = _decode(rollout, tokenizer, examples, num_samples, max_new_tokens, temperature,
                                            False, batch_size, prompt_style)
    correct, paid, rates = _rates(texts, lengths, truncated, [ex for ex in examples for _ in range(num_samples)])
    counts, paid_counts, distinct = [], [], []
    for problem, start in zip(problems, range(0, len(texts), num_samples)):
        counts.append(sum(correct[start: start + num_samples]))
        paid_counts.append(sum(paid[start: start + num_samples]))
        answers = [answer_key(text) for text in texts[start: start + num_samples]]
        distinct.append(len(set(answers) - {None}))
        problem.update(sampled_correct=counts[-1], sampled_paid=paid_counts[-1], sampled_answers=answers)
    result["pass@k"] = {str(k): v for k, v in mean_pass_at_k(num_samples, counts, ks).items()}
    result["pass@k_paid"] = {str(k): v for k, v in mean_pass_at_k(num_samples, paid_counts, ks).items()}
    result["diversity"] = _mean(distinct)
    result["sampled"] = rates
    return result


def flat_metrics(result: Dict[str, object], prefix: str = "eval_") -> Dict[str, float]:
    """One flat record of :func:`evaluate_examples`'s result, for ``metrics.jsonl``: ``eval_accuracy`` (greedy
    pass@1), the greedy ``eval_derived_accuracy``, ``eval_format_rate``, ``eval_truncated_rate``,
    ``eval_completion_len_mean`` and ``eval_top_answer_share``, and
    with samples ``eval_pass@k`` and ``eval_pass@k_paid`` for each k (sampled) and ``eval_diversity``."""
    record = {f"{prefix}accuracy": result["pass@1"]}
    record.update({f"{prefix}{key}": value for key, value in result["greedy"].items() if key != "accuracy"})
    record.update({f"{prefix}pass@{k}": value for k, value in result.get("pass@k", {}).items()})
    record.update({f"{prefix}pass@{k}_paid": value for k, value in result.get("pass@k_paid", {}).items()})
    if "diversity" in result:
        record[f"{prefix}diversity"] = result["diversity"]
    return record


def format_table(result: Dict[str, object], num_samples: int = 0, temperature: float = 0.0) -> str:
    """The metrics of :func:`evaluate_examples` as a two-column markdown table."""
    rows = [("problems", f"{result['num_problems']}"), ("pass@1 (greedy)", f"{result['pass@1']:.4f}"),
            ("one constant answer (the most common gold)", f"{result['majority_baseline']:.4f}"),
            ("pass@1 (greedy), answer derived", f"{result['greedy']['derived_accuracy']:.4f}"),
            ("greedy: share of the most frequent answer", f"{result['greedy']['top_answer_share']:.4f} "
                                                          f"({result['top_answer']})")]
    for k, value in result.get("pass@k", {}).items():
        rows.append((f"pass@{k} (n={num_samples}, T={temperature:g})", f"{value:.4f}"))
    for k, value in result.get("pass@k_paid", {}).items():
        rows.append((f"pass@{k} (n={num_samples}, T={temperature:g}), answer derived", f"{value:.4f}"))
    if "diversity" in result:
        rows.append(("distinct answers per problem", f"{result['diversity']:.2f}"))
    for part in ("greedy", "sampled"):
        if part in result:
            rates = result[part]
            rows += [(f"{part}: format rate", f"{rates['format_rate']:.4f}"),
                     (f"{part}: truncated rate", f"{rates['truncated_rate']:.4f}"),
                     (f"{part}: mean length (tokens)", f"{rates['completion_len_mean']:.1f}")]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"| {'-' * width} | ----- |"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _resolve_checkpoint(model: str) -> str:
    """A run folder's checkpoint/ for a run folder; ``model`` otherwise."""
    from rlfuse.engine.checkpoint import find_checkpoint

    folder = Path(model)
    if folder.is_dir() and not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
        checkpoint = find_checkpoint(folder)
        if checkpoint is not None:
            return str(checkpoint)
    return model


def load_for_eval(model: str, base_model: Optional[str], dtype: torch.dtype, device: torch.device):
    """``(model, tokenizer)`` in eval mode: a full model or checkpoint as is, a LoRA checkpoint merged into its base.

    Raises:
        ValueError: a LoRA checkpoint whose base model is neither given nor recorded in its run state.
    """
    from rlfuse.engine.checkpoint import STATE_FILE
    from rlfuse.engine.model import load_model_and_tokenizer

    model = _resolve_checkpoint(model)
    folder = Path(model)
    if not (folder / "adapter_config.json").is_file():
        policy, tokenizer = load_model_and_tokenizer(model, dtype, str(device))
        return policy.eval(), tokenizer
    if base_model is None and (folder / STATE_FILE).is_file():
        base_model = json.loads((folder / STATE_FILE).read_text()).get("args", {}).get("model")
    if base_model is None:
        raise ValueError(f"{folder} holds LoRA adapters only; pass --base-model with the model they were trained on")
    from peft import PeftModel

    base, tokenizer = load_model_and_tokenizer(base_model, dtype, str(device))
    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload().eval(), tokenizer


def make_rollout(model, tokenizer, stop_after_answer: bool = True):
    """The engine's sampler for ``model`` (ending completions after their ``#### <number>`` line when
    ``stop_after_answer``), or transformers ``generate`` for a model it cannot run.

    Raises:
        ValueError: ``stop_after_answer`` for a model only transformers ``generate`` runs.
    """
    from rlfuse.engine.rewards import ANSWER_LINE_STOP
    from rlfuse.engine.rollout import HFRollout
    from rlfuse.engine.sampler import SharedPrefixSampler

    try:
        return SharedPrefixSampler(model, tokenizer, stop_pattern=ANSWER_LINE_STOP if stop_after_answer else None)
    except ValueError as error:
        if stop_after_answer:
            raise ValueError(f"the engine's sampler cannot run this model ({error}), and transformers generate "
                             "does not stop after the answer line; pass --no-stop-after-answer") from None
        return HFRollout(model, tokenizer)


def load_and_evaluate(model: str, base_model: Optional[str], dtype: str, mixed_precision: str,
                      device: torch.device, examples: Sequence[Example], stop_after_answer: bool,
                      **evaluate_kwargs) -> Dict[str, object]:
    """Load ``model`` (:func:`load_for_eval`) in ``--dtype dtype`` and run :func:`evaluate_examples` on
    ``examples`` under ``--mixed-precision mixed_precision``; ``evaluate_kwargs`` go to it (num_samples, ...).

    Raises:
        ValueError: as :func:`load_for_eval`, :func:`make_rollout` and :func:`evaluate_examples`.
    """
    from rlfuse.engine.model import resolve_dtype

    weight_dtype = resolve_dtype(dtype, device)
    policy, tokenizer = load_for_eval(model, base_model, weight_dtype, device)
    with autocast(device, resolve_autocast_dtype(mixed_precision, device, weight_dtype)):
        return evaluate_examples(make_rollout(policy, tokenizer, stop_after_answer), tokenizer, examples,
                                 **evaluate_kwargs)


def run_eval(args: EvalArgs) -> Tuple[Dict[str, object], Path]:
    """Run ``rlfuse eval``: evaluate, write the JSON (metrics plus the options), return ``(result, path)``."""
    args.validate()
    examples = load_examples(args.data, args.split)
    if args.num_problems:
        examples = examples[: args.num_problems]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    result = load_and_evaluate(args.model, args.base_model, args.dtype, args.mixed_precision, device, examples,
                               args.stop_after_answer, num_samples=args.num_samples, ks=args.ks,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               batch_size=args.batch_size, seed=args.seed, prompt_style=args.prompt_style)
    result["args"] = asdict(args)
    name = Path(args.data).stem if args.data.endswith(".jsonl") else f"{args.data}-{args.split}"
    path = Path(args.output or f"runs/eval-{name}-{datetime.now():%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result, path
