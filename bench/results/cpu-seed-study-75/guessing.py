"""How much of each model's greedy pass@1 on the 300 SVAMP test problems comes from its most frequent answer.

    python bench/results/cpu-seed-study-75/guessing.py   # writes guessing.json beside this file

Reads the per-problem records of the base model (../cpu-seed-study/per-problem/base.json) and of the three
step-75 checkpoints (seed<N>/eval-step75.json), and the SVAMP test questions for ``correct_and_derived``
(correct, not cut, and derived from the question: rlfuse.engine.derivation).
"""

import json
from collections import Counter
from pathlib import Path

from rlfuse.engine.data import load_examples
from rlfuse.engine.derivation import derivation_shown
from rlfuse.engine.evaluate import answer_concentration

HERE = Path(__file__).parent
FILES = {"base": HERE.parent / "cpu-seed-study" / "per-problem" / "base.json",
         **{f"seed {s}": HERE / f"seed{s}" / "eval-step75.json" for s in (0, 1, 2)}}


def summarize(problems, questions):
    top, share = answer_concentration([p["greedy_answer"] for p in problems])
    top_count = round(share * len(problems))
    correct = sum(p["greedy_correct"] for p in problems)
    from_top = sum(p["greedy_correct"] and p["greedy_answer"] == top for p in problems)
    derived = sum(p["greedy_correct"] and not p["greedy_truncated"]
                  and derivation_shown(p["greedy_completion"], question, p["gold"])
                  for p, question in zip(problems, questions))
    return {"correct": correct, "top_answer": top, "top_answer_count": top_count,
            "correct_with_top_answer": from_top, "correct_with_other_answers": correct - from_top,
            "correct_and_derived": derived}


def main():
    questions = [example.question for example in load_examples("svamp", "test")]
    rows = {name: summarize(json.loads(path.read_text())["problems"], questions) for name, path in FILES.items()}
    golds = Counter(p["gold"] for p in json.loads(FILES["base"].read_text())["problems"])
    answer, count = golds.most_common(1)[0]
    out = {"problems": 300, "majority_baseline": {"answer": answer, "correct": count}, "models": rows}
    (HERE / "guessing.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
