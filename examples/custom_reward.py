"""Train on your own prompts with your own reward functions (TRL's signature), from the command line or Python.

The data, ``examples/data/keywords.jsonl``, holds conversational prompts ("Describe the sea in one short
sentence.") and a ``keyword`` column ("blue"). Two rewards: the keyword appears in the completion, and the
completion is short. Dataset columns reach a reward function as keyword arguments, one list per column.

From the command line::

    rlfuse train --data examples/data/keywords.jsonl \\
        --reward examples/custom_reward.py:keyword_reward --reward examples/custom_reward.py:brevity_reward \\
        --reward-weights 1.0 0.5 --steps 20 --max-new-tokens 48

From Python (any ``rlfuse train`` option overrides the defaults below, e.g. ``--steps 2``)::

    python examples/custom_reward.py --steps 20
"""

from __future__ import annotations

from typing import List, Optional

BREVITY_TOKENS = 32  # completions up to this many tokens earn the whole brevity reward


def _text(completion) -> str:
    """A completion's text: plain prompts give strings, conversational ones a list with one assistant message."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def keyword_reward(prompts, completions, completion_ids, keyword: Optional[List[str]] = None,
                   **kwargs) -> List[Optional[float]]:
    """1.0 when the row's ``keyword`` appears in the completion (any case), else 0.0; None for a row without
    one (the function does not apply to it)."""
    keywords = keyword or [None] * len(completions)
    return [None if word is None else float(word.lower() in _text(c).lower()) for c, word in zip(completions, keywords)]


def brevity_reward(prompts, completions, completion_ids, **kwargs) -> List[float]:
    """1.0 for a completion of at most ``BREVITY_TOKENS`` tokens, falling linearly to 0 at twice that."""
    return [max(0.0, min(1.0, 2.0 - len(ids) / BREVITY_TOKENS)) for ids in completion_ids]


def main() -> None:
    import tyro

    from rlfuse.engine.args import TrainArgs
    from rlfuse.engine.trainer import train

    defaults = TrainArgs(data="examples/data/keywords.jsonl", reward_weights=(1.0, 0.5), steps=20,
                         prompts_per_step=4, num_generations=4, max_new_tokens=48, learning_rate=2e-5)
    args = tyro.cli(TrainArgs, default=defaults)
    output_dir = train(args, reward_funcs=[keyword_reward, brevity_reward])
    print(f"done: metrics in {output_dir}/metrics.jsonl (reward/keyword_reward, reward/brevity_reward)")


if __name__ == "__main__":
    main()
