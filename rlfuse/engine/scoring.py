"""Scoring sampled completions with reward functions: TRL's reward inputs built from prompt rows and a batch, and
the reward-based evaluation used when the math evaluation does not apply."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from rlfuse.engine.prompt_data import PromptRow, is_conversational, prompt_token_ids
from rlfuse.engine.reward_funcs import RewardScores, RewardSet, trainer_state
from rlfuse.engine.rollout import RolloutBatch, batch_truncated


def reward_inputs(rows: Sequence[PromptRow], num_generations: int, texts: Sequence[str], batch: RolloutBatch):
    """``(prompts, completions, completion_ids, columns)`` for B = len(rows) × G samples, as TRL builds them.

    A conversational prompt's completion is one assistant message (its content prefixed with the prompt's last
    message when that one is the assistant's, continued); a plain prompt's is the text. ``completion_ids`` are
    each sample's tokens up to and including its stop token; ``columns`` map every column of the rows to B
    values (None where a row lacks it).
    """
    prompts, completions = [], []
    for row in rows:
        for _ in range(num_generations):
            prompts.append(row.prompt)
    for prompt, text in zip(prompts, texts):
        if is_conversational(prompt):
            bootstrap = prompt[-1]["content"] if prompt[-1]["role"] == "assistant" else ""
            completions.append([{"role": "assistant", "content": bootstrap + text}])
        else:
            completions.append(text)
    lengths = batch.completion_mask.sum(1).tolist()
    completion_ids = [ids[:n] for ids, n in zip(batch.completion_ids.tolist(), lengths)]
    names = list(dict.fromkeys(name for row in rows for name in row.columns))
    columns = {name: [row.columns.get(name) for row in rows for _ in range(num_generations)] for name in names}
    return prompts, completions, completion_ids, columns


def score(rewards: RewardSet, rows: Sequence[PromptRow], num_generations: int, texts: Sequence[str],
          batch: RolloutBatch, truncated: torch.Tensor, step: int, max_steps: int) -> RewardScores:
    """The reward set's scores of a sampled batch (rows in groups of ``num_generations``).

    Raises:
        rlfuse.engine.reward_funcs.RewardFunctionError: a function raised or returned a bad value.
    """
    prompts, completions, completion_ids, columns = reward_inputs(rows, num_generations, texts, batch)
    return rewards(prompts, completions, completion_ids, columns, trainer_state=trainer_state(step, max_steps),
                   completion_truncated=[bool(t) for t in truncated.tolist()])


@torch.no_grad()
def evaluate_rewards(rollout, tokenizer, rewards: RewardSet, rows: Sequence[PromptRow], max_new_tokens: int,
                     step: Optional[int] = None, max_steps: int = 0, batch_size: int = 32) -> Dict[str, object]:
    """Greedy completions of ``rows`` scored by ``rewards``: ``eval_reward_mean``, ``eval_reward/<name>`` and
    ``eval_truncated_rate``, plus ``problems`` (per row: prompt, completion, reward, and each function's).

    Raises:
        rlfuse.engine.reward_funcs.RewardFunctionError: as :func:`score`.
    """
    totals: List[float] = []
    per_function: Dict[str, List[Optional[float]]] = {name: [] for name in rewards.names}
    problems, cut = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = rollout.generate([prompt_token_ids(tokenizer, row.prompt) for row in chunk], 1, max_new_tokens,
                                 1.0, greedy=True)
        texts = tokenizer.batch_decode(batch.completion_ids, skip_special_tokens=True)
        truncated = batch_truncated(batch, rollout.stop_ids)
        scores = score(rewards, chunk, 1, texts, batch, truncated, step or 0, max_steps)
        totals += scores.total
        cut += truncated.tolist()
        for name in rewards.names:
            per_function[name] += scores.per_function[name]
        for index, row in enumerate(chunk):
            problems.append({"prompt": row.prompt, "completion": texts[index], "reward": scores.total[index],
                             **{f"reward/{n}": scores.per_function[n][index] for n in rewards.names}})
    metrics: Dict[str, object] = {"eval_reward_mean": sum(totals) / len(totals) if totals else None,
                                  "eval_truncated_rate": sum(cut) / len(cut) if cut else None}
    for name, values in per_function.items():
        applied = [v for v in values if v is not None]
        metrics[f"eval_reward/{name}"] = sum(applied) / len(applied) if applied else None
    return {**metrics, "problems": problems}
