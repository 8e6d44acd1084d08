"""The engine: model loading, rollout, rewards, the trainer and the CLI. Builds on ``rlfuse.algos``."""
