"""Drop-in use of rlfuse's fused losses inside other trainers (TRL, verl).

Each submodule imports its framework lazily, so ``import rlfuse`` never needs TRL or verl installed.
"""
