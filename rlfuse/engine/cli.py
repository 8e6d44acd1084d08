"""The ``rlfuse`` command line: ``rlfuse train|eval|compare [OPTIONS]`` (options documented by ``--help``)."""

from __future__ import annotations

import errno
import os
import sys
from typing import Optional, Sequence

import tyro

from rlfuse.engine.args import TrainArgs
from rlfuse.engine.compare import CompareArgs
from rlfuse.engine.evaluate import EvalArgs


def _run(args) -> str:
    """Run the parsed subcommand; return the line to print when it is done."""
    if isinstance(args, CompareArgs):
        from rlfuse.engine.compare import run_compare

        folder = run_compare(args)
        print((folder / "summary.md").read_text())
        return f"rlfuse: done. Outputs in {folder}/: compare.png, summary.json, summary.md, one folder per algorithm"
    if isinstance(args, EvalArgs):
        from rlfuse.engine.evaluate import format_table, run_eval

        result, path = run_eval(args)
        print(format_table(result, args.num_samples, args.temperature))
        return f"rlfuse: done. Metrics in {path}"
    from rlfuse.engine.trainer import train  # heavy imports only once the options parsed

    from rlfuse.engine.eval_summary import before_after_table

    output_dir = train(args)
    table = before_after_table(output_dir / "eval")
    if table:
        print(table)
    outputs = "metrics.jsonl, reward.png" + (", checkpoint/" if args.save_every else "")
    return f"rlfuse: done. Outputs in {output_dir}/: {outputs}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand; return the exit code.

    Bad options or inputs (``ValueError``, ``FileNotFoundError``) and a disk too full for a checkpoint
    (``OSError`` ``ENOSPC``) end with a one-line error on stderr and exit code 2; ``RLFUSE_DEBUG=1`` re-raises
    them with their traceback.
    """
    args = tyro.extras.subcommand_cli_from_dict({"train": TrainArgs, "eval": EvalArgs, "compare": CompareArgs},
                                                args=argv, prog="rlfuse")
    try:
        message = _run(args)
    except (ValueError, OSError) as error:
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.errno != errno.ENOSPC:
            raise
        if os.environ.get("RLFUSE_DEBUG"):
            raise
        print(f"rlfuse: error: {error}  (set RLFUSE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
