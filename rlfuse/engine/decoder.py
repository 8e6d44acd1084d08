"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) over a transformers
model's own parameters: nothing is copied, so the optimizer's updates are what rollout samples from.

transformers loads the weights (a safetensors folder, a hub id, or a GGUF file); this module reimplements
only the forward, so that rollout can share one prompt's KV cache across its G samples (see
``rlfuse.engine.sampler``) without transformers' cache classes. Causal attention uses flash-attn when it is
importable on a GPU, otherwise PyTorch's SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension, the rotary embedding's pairing."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class LayerKV:
    """One layer's keys and values, (batch, kv_heads, length, head_dim)."""

    keys: torch.Tensor
    values: torch.Tensor


# attend(layer_index, q, k, v) -> (batch, heads, length, head_dim); q, k rotated, k/v of this call only.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DecoderLM(torch.nn.Module):
    """The decoder stack of a transformers Llama-family causal LM, sharing its parameters.

    Args:
        hf_model: a loaded ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``Qwen3ForCausalLM`` (SmolLM2 is a Llama with tied embeddings).

    Raises:
        ValueError: another architecture, or an activation other than SiLU.
    """

    def __init__(self, hf_model):
        super().__init__()
        config = hf_model.config
        if config.model_type not in SUPPORTED:
            raise ValueError(f"DecoderLM supports {', '.join(SUPPORTED)} models, not {config.model_type!r}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"DecoderLM supports SiLU MLPs, not {config.hidden_act!r}")
        base = hf_model.get_decoder()
        self.embed_tokens, self.layers, self.norm, self.rotary = base.embed_tokens, base.layers, base.norm, base.rotary_emb
        self.lm_head = hf_model.get_output_embeddings()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.sliding_window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (batch, 1, length, head_dim) for integer positions (batch, length), from the model's own
        rotary module (so every rope scaling transformers supports applies)."""
        probe = torch.empty(0, device=position_ids.device, dtype=dtype)
        cos, sin = self.rotary(probe, position_ids)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: Attend,
                      checkpoint: bool = False) -> torch.Tensor:
        """Last hidden states (batch, length, H), after the final norm; ``attend`` does the attention.

        ``checkpoint`` recomputes each layer in the backward instead of keeping its activations.
        """
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        for index, layer in enumerate(self.layers):
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self.layer_forward, index, layer, x, cos, sin, attend,
                                                      use_reentrant=False)
            else:
                x = self.layer_forward(index, layer, x, cos, sin, attend)
        return self.norm(x)

    def layer_forward(self, index: int, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      attend: Attend) -> torch.Tensor:
        """One decoder layer on (batch, length, H): attention through ``attend``, then the MLP."""
        batch, length = x.shape[:2]
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(batch, length, -1, self.head_dim)
        k = attn.k_proj(h).view(batch, length, -1, self.head_dim)
        v = attn.v_proj(h).view(batch, length, -1, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3 normalizes queries and keys per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = attend(index, q, k, v)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits (..., V) in float32."""
        return self.lm_head(hidden).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-sequence forward: logits (batch, length, V) float32, causal, left padding allowed.

        Args:
            input_ids: (batch, length) int64.
            attention_mask: (batch, length) 0/1, 1 on real tokens (default: all real).
        """
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.logits(self.hidden_states(input_ids, position_ids, causal_attend(mask.bool(), self.sliding_window)))


def causal_padding_mask(mask: torch.Tensor, sliding_window: Optional[int] = None) -> torch.Tensor:
    """(batch, 1, L, L) bool: query i sees key j <= i that is a real token (and within the window).

    Rows of padding queries see themselves, so that no softmax runs over an empty set.
    """
    length = mask.shape[-1]
    idx = torch.arange(length, device=mask.device)
    allowed = (idx[None, :] <= idx[:, None])[None] & mask[:, None, :]
    if sliding_window:
        allowed &= (idx[:, None] - idx[None, :] < sliding_window)[None]
    allowed |= torch.eye(length, dtype=torch.bool, device=mask.device)[None]
    return allowed[:, None]


def flash_attn_varlen():
    """flash-attn's ``flash_attn_varlen_func`` when the package is importable, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def causal_attend(mask: torch.Tensor, sliding_window: Optional[int] = None) -> Attend:
    """Causal self-attention over left-padded rows, ``mask`` (batch, L) bool True on real tokens.

    Uses flash-attn on unpadded tokens when it is importable and the inputs are fp16/bf16 CUDA tensors,
    otherwise PyTorch's SDPA with a (batch, 1, L, L) mask. Outputs at padding positions are unspecified.
    """
    allowed = None
    flash = flash_attn_varlen() if mask.is_cuda else None
    if flash is not None:  # unpadded sequence lengths, once for every layer
        lengths = mask.sum(-1, dtype=torch.int32)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        longest = int(lengths.max())

    def attend(index, q, k, v):
        nonlocal allowed
        if flash is not None and q.dtype in (torch.float16, torch.bfloat16):
            unpad = lambda x: x.transpose(1, 2)[mask]  # noqa: E731 - (tokens, heads, d)
            out = flash(unpad(q), unpad(k), unpad(v), cu_seqlens, cu_seqlens, longest, longest, causal=True,
                        window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1))
            padded = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
            padded[mask] = out
            return padded.transpose(1, 2)
        if allowed is None:
            allowed = causal_padding_mask(mask, sliding_window)
        return sdpa(q, k, v, allowed)

    return attend


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads and a bool mask (True = attend)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def collect_kv(store: List[Optional[LayerKV]], attend: Attend) -> Attend:
    """Wrap ``attend`` so that each layer's keys and values are also kept in ``store[layer]``."""

    def wrapped(index, q, k, v):
        store[index] = LayerKV(k, v)
        return attend(index, q, k, v)

    return wrapped
