"""Studies of what rlfuse's training does: each one a command that re-runs it and a summary that turns its runs
into the JSON and figure kept under ``bench/results/<study>/`` (``docs/results.md`` lists them)."""
