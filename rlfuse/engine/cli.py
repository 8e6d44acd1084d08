"""The ``rlfuse`` command line: ``rlfuse train [OPTIONS]`` (options documented by ``--help``)."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import tyro

from rlfuse.engine.args import TrainArgs


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand; return the exit code.

    Bad options or inputs (``ValueError``, ``FileNotFoundError``) end with a one-line error on stderr and
    exit code 2; ``RLFUSE_DEBUG=1`` re-raises them with their traceback.
    """
    args = tyro.extras.subcommand_cli_from_dict({"train": TrainArgs}, args=argv, prog="rlfuse")
    from rlfuse.engine.trainer import train  # heavy imports only once the options parsed

    try:
        output_dir = train(args)
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("RLFUSE_DEBUG"):
            raise
        print(f"rlfuse: error: {error}  (set RLFUSE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    print(f"rlfuse: done. Outputs in {output_dir}/: metrics.jsonl, reward.png, checkpoint/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
