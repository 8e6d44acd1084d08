"""rlfuse: fused kernels and a lean engine for reinforcement learning of LLMs (GRPO and its family, TOPR, ROVER).

Layers, one direction only: ``rlfuse.kernels`` <- ``rlfuse.algos`` <- ``rlfuse.engine``.
"""

from rlfuse.algos import (
    ALGO_CONFIGS,
    DAPOConfig,
    DrGRPOConfig,
    FusedLinearPolicyLoss,
    GRPOConfig,
    GSPOConfig,
    PolicyLossConfig,
    ROVERConfig,
    TOPRConfig,
    compute_advantages,
    get_config,
    group_advantages,
    policy_loss,
    policy_loss_from_logits,
)
from rlfuse.kernels import TokenLogprobs, linear_token_logprobs, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "ALGO_CONFIGS", "DAPOConfig", "DrGRPOConfig", "FusedLinearPolicyLoss", "GRPOConfig", "GSPOConfig", "PolicyLossConfig", "ROVERConfig",
    "TOPRConfig", "TokenLogprobs", "compute_advantages", "get_config", "group_advantages", "policy_loss",
    "linear_token_logprobs", "policy_loss_from_logits", "token_logprobs",
]
