"""GSM8K-format data: read JSONL (``question``, ``answer`` ending in ``#### N``) and build chat prompts.

Two named data sets load by name: ``gsm8k`` ("Training Verifiers to Solve Math Word Problems") and ``svamp``
("Are NLP Models really able to Solve Simple Math Word Problems?"), the latter converted to the GSM8K layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from rlfuse.engine.equation import equation_of

INSTRUCTION = "Solve the problem step by step. End with a last line '#### <number>' holding only the final number."
# --prompt-style one_shot: one worked example, written for this purpose (in no data set), before the question.
ONE_SHOT_INSTRUCTION = "Solve the math problem step by step and end with a line '#### <number>'."
ONE_SHOT_QUESTION = "Tom has 3 boxes with 4 apples in each box. He eats 2 apples. How many apples does he have left?"
ONE_SHOT_ANSWER = "Tom has 3 * 4 = 12 apples.\nAfter eating 2, he has 12 - 2 = 10 apples.\n#### 10"
PROMPT_STYLES = ("zero_shot", "one_shot")  # what --prompt-style accepts
DATASETS = ("gsm8k", "svamp")  # names --data and --eval-data accept besides a JSONL path


@dataclass(frozen=True)
class Example:
    """One problem: its ``question``, the ``gold`` final answer (the text after ``####``) and, for data that
    gives one (SVAMP), the gold ``equation`` over the question's numbers (:func:`rlfuse.engine.equation.equation_of`;
    None for GSM8K's worked solutions)."""

    question: str
    gold: str
    equation: Optional[str] = None


def gold_answer(answer: str) -> str:
    """The final answer after the last ``####`` of a GSM8K solution, with thousands separators removed.

    Raises:
        ValueError: the solution has no ``####``.
    """
    if "####" not in answer:
        raise ValueError("the answer has no '#### N' final line")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def read_jsonl(path: str | os.PathLike) -> List[Example]:
    """Read a GSM8K-format JSONL file, one ``{"question": ..., "answer": "... #### N"}`` object per line.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line that is not a JSON object with string ``question`` and ``answer`` fields ending in
            ``#### N`` (the message gives the file and line number), or a file with no examples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; pass a GSM8K-format JSONL or one of {DATASETS}")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                question, answer = record.get("question"), record.get("answer")
                if not isinstance(question, str) or not isinstance(answer, str):
                    raise ValueError("needs string fields 'question' and 'answer'")
                examples.append(Example(question.strip(), gold_answer(answer), equation_of(answer)))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}, line {number}: malformed GSM8K record: {error}") from None
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def shared_data_path(name: str, split: str) -> Optional[Path]:
    """The workspace copy of data set ``name`` (``gsm8k``/``svamp``), split ``split`` (``train``/``test``), if any.

    Looks in ``$RLFUSE_DATA_DIR/<name>``, then ``../shared/data/<name>`` beside the working directory and
    beside the source checkout.
    """
    roots = []
    if os.environ.get("RLFUSE_DATA_DIR"):
        roots.append(Path(os.environ["RLFUSE_DATA_DIR"]))
    roots.append(Path.cwd().parent / "shared" / "data")
    roots.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    for root in roots:
        candidate = root / name / f"{split}.jsonl"
        if candidate.is_file():
            return candidate
    return None


def shared_gsm8k_path(split: str) -> Optional[Path]:
    """The workspace copy of GSM8K ``split``; see :func:`shared_data_path`."""
    return shared_data_path("gsm8k", split)


def load_examples(data: str, split: str = "train") -> List[Example]:
    """Examples from ``data``: a JSONL path, or a name of :data:`DATASETS` (its ``split``).

    ``gsm8k`` reads the workspace copy if present, else ``openai/gsm8k`` through ``datasets``; ``svamp`` reads
    the workspace copy (``$RLFUSE_DATA_DIR/svamp/{train,test}.jsonl``).

    Raises:
        FileNotFoundError: a path that does not exist, or ``svamp`` without a workspace copy.
        ValueError: as :func:`read_jsonl`.
    """
    if data not in DATASETS:
        return read_jsonl(data)
    local = shared_data_path(data, split)
    if local is not None:
        return read_jsonl(local)
    if data == "svamp":
        raise FileNotFoundError(f"no SVAMP {split} split found: put svamp/{split}.jsonl (GSM8K layout) under "
                                "$RLFUSE_DATA_DIR, or pass the JSONL path")
    from datasets import load_dataset  # only when no local copy exists

    rows = load_dataset("openai/gsm8k", "main", split=split)
    return [Example(row["question"].strip(), gold_answer(row["answer"]), equation_of(row["answer"])) for row in rows]


def load_gsm8k(data: str, split: str = "train") -> List[Example]:
    """The same as :func:`load_examples` (the name predates SVAMP)."""
    return load_examples(data, split)


def prompt_text(question: str, style: str = "zero_shot") -> str:
    """The user message for ``question``: ``zero_shot`` is the question then :data:`INSTRUCTION`;
    ``one_shot`` is :data:`ONE_SHOT_INSTRUCTION`, one worked example (:data:`ONE_SHOT_QUESTION`,
    :data:`ONE_SHOT_ANSWER`) and the question, each after ``Question:`` and ending in ``Answer:``.

    Raises:
        ValueError: ``style`` not in :data:`PROMPT_STYLES`.
    """
    if style == "zero_shot":
        return f"{question}\n{INSTRUCTION}"
    if style == "one_shot":
        return (f"{ONE_SHOT_INSTRUCTION}\n\nQuestion: {ONE_SHOT_QUESTION}\nAnswer:\n{ONE_SHOT_ANSWER}\n\n"
                f"Question: {question}\nAnswer:")
    raise ValueError(f"prompt style {style!r} is not one of {PROMPT_STYLES}")


def build_prompt(tokenizer, question: str, style: str = "zero_shot") -> List[int]:
    """Token ids of the user message :func:`prompt_text` (``question`` in ``style``) through the tokenizer's
    chat template, with the generation prompt appended.

    Raises:
        ValueError: ``style`` not in :data:`PROMPT_STYLES`.
    """
    messages = [{"role": "user", "content": prompt_text(question, style)}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def learnable_subset(rows: Sequence[dict], problems: Sequence[dict]) -> List[dict]:
    """The records of ``rows`` whose problem the evaluated model earned the reward on sometimes but not always.

    Difficulty filtering by the base model's pass rate, as RL recipes for reasoning do before training: a
    group whose G samples are all unpaid, or all paid, has zero group-relative advantages and teaches nothing.
    A problem counts as solved only under the paid rule of :func:`rlfuse.engine.rewards.score` (right answer,
    derived, by the gold equation where the data gives one, not cut), the rule training pays by; a right answer
    without its derivation does not count.

    Args:
        rows: the source JSONL records (dicts with ``question`` and ``answer``), in the order evaluated.
        problems: ``rlfuse eval``'s per-problem records of the same problems, with samples
            (``gold``, ``greedy_paid``, ``sampled_paid``, ``sampled_answers``).

    Returns:
        The records paid greedily or in at least one sample, and not in every sample, in order.

    Raises:
        ValueError: different lengths, records without samples (evaluate with ``--num-samples`` above 0) or
            without the paid counts (an evaluation written before the paid rule: evaluate again), or a record
            whose gold answer differs from its row's (the two are not the same problems in order).
    """
    if len(rows) != len(problems):
        raise ValueError(f"{len(rows)} rows but {len(problems)} evaluated problems; evaluate every row, in order")
    kept = []
    for number, (row, problem) in enumerate(zip(rows, problems)):
        if "sampled_answers" not in problem:
            raise ValueError("the evaluation has no samples; run rlfuse eval with --num-samples above 0")
        if "sampled_paid" not in problem or "greedy_paid" not in problem:
            raise ValueError(f"problem {number} has no greedy_paid / sampled_paid: the evaluation predates the "
                             "paid rule; run rlfuse eval again")
        if gold_answer(row["answer"]) != problem["gold"]:
            raise ValueError(f"row {number}: gold {gold_answer(row['answer'])!r} but the evaluation's is "
                             f"{problem['gold']!r}; evaluate the same file, every row, in order")
        samples = len(problem["sampled_answers"])
        solved = problem["greedy_paid"] or problem["sampled_paid"] > 0
        if solved and problem["sampled_paid"] < samples:
            kept.append(row)
    return kept
