"""Fused ops and their plain-PyTorch references. Imports nothing from ``rlfuse.algos`` or ``rlfuse.engine``."""

from rlfuse.kernels.linear_logprobs import linear_token_logprobs, linear_token_logprobs_reference
from rlfuse.kernels.logprobs import IGNORE_INDEX, TokenLogprobs, token_logprobs, token_logprobs_reference

__all__ = ["IGNORE_INDEX", "TokenLogprobs", "linear_token_logprobs", "linear_token_logprobs_reference",
           "token_logprobs", "token_logprobs_reference"]
