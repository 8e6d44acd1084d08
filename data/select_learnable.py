"""Write the problems of a GSM8K-format JSONL that a model solves sometimes but not always.

    rlfuse eval --data SOURCE.jsonl --num-samples 4 --output EVAL.json ...
    python data/select_learnable.py EVAL.json SOURCE.jsonl OUT.jsonl

See ``rlfuse.engine.data.learnable_subset``; every source record is kept whole (its id and type too).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlfuse.engine.data import learnable_subset


def main(eval_json: str, source: str, out: str) -> None:
    """Read the evaluation and its source, write the kept records to ``out`` and say how many."""
    problems = json.loads(Path(eval_json).read_text())["problems"]
    rows = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
    kept = learnable_subset(rows, problems)
    Path(out).write_text("".join(json.dumps(row) + "\n" for row in kept))
    print(f"kept {len(kept)} of {len(rows)} problems in {out}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python data/select_learnable.py EVAL.json SOURCE.jsonl OUT.jsonl")
    main(*sys.argv[1:])
