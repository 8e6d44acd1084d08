"""The math of each algorithm: advantages, token losses, KL and aggregation, as pure functions and configs.

Depends on ``rlfuse.kernels`` only, never on ``rlfuse.engine``.
"""

from rlfuse.algos.advantages import balanced_drop_advantages, compute_advantages, group_advantages
from rlfuse.algos.configs import (
    ALGO_CONFIGS,
    AsymREConfig,
    CISPOConfig,
    DAPOConfig,
    DrGRPOConfig,
    GMPOConfig,
    GRPOConfig,
    GSPOConfig,
    OPMDConfig,
    PolicyLossConfig,
    RECConfig,
    RECISConfig,
    RECRingConfig,
    REDDropConfig,
    REDWeightConfig,
    REINFORCEConfig,
    LUSPOConfig,
    ROVERConfig,
    SAPOConfig,
    TOPRConfig,
    VESPOConfig,
    get_config,
)
from rlfuse.algos.fused import policy_loss_from_logits
from rlfuse.algos.fused_linear import FusedLinearPolicyLoss
from rlfuse.algos.losses import aggregate_loss, kl_penalty, masked_mean
from rlfuse.algos.policy_loss import policy_loss

__all__ = [
    "ALGO_CONFIGS", "AsymREConfig", "CISPOConfig", "DAPOConfig", "FusedLinearPolicyLoss", "DrGRPOConfig", "GMPOConfig",
    "GRPOConfig", "GSPOConfig", "OPMDConfig", "PolicyLossConfig", "RECConfig", "RECISConfig", "RECRingConfig",
    "REDDropConfig", "REDWeightConfig", "REINFORCEConfig", "ROVERConfig", "TOPRConfig", "SAPOConfig", "LUSPOConfig",
    "VESPOConfig", "aggregate_loss",
    "balanced_drop_advantages", "compute_advantages", "get_config", "group_advantages", "kl_penalty", "masked_mean",
    "policy_loss", "policy_loss_from_logits",
]
