"""Shared-prefix, packed training forward: each group's prompt is computed once for its G completions.

A group is packed as one sequence: its prompt (without padding), then each completion without its last
token (no position reads it) and without padding. The linear layers and the MLP run on the packed tokens
of all groups together, with no padding anywhere. Attention runs per group under a mask where prompt
tokens are causal among themselves and each completion sees the whole prompt plus its own earlier
tokens, so every completion token gets exactly the hidden state it gets in the naive per-sample padded
forward, while the prompt's keys, values and activations are computed once and receive the summed
gradient of the G completions. The hidden states that predict the completion tokens are then gathered
into the (B, T, H) layout that :class:`rlfuse.algos.FusedLinearPolicyLoss` reads.

The prompt-sharing idea in training is Prefix Grouper's ("Prefix Grouper: Efficient GRPO Training
through Shared-Prefix Forward").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rlfuse.engine.decoder import DecoderLM, sdpa
from rlfuse.engine.rollout import RolloutBatch

PAD_SLOT, PROMPT = -2, -1  # sequence ids of padding slots and of prompt tokens in the per-group layout


@dataclass
class PackedGroups:
    """A :class:`RolloutBatch` packed by groups. N packed tokens, ``groups`` groups, L the longest group.

    Attributes:
        input_ids: (1, N) int64, the groups one after another.
        position_ids: (1, N) int64, positions as in the padded forward (prompt 0..P-1, completion P..).
        slot: (N,) int64, the index of each packed token in the (groups · L) per-group layout.
        allowed: (groups, 1, L, L) bool attention mask in that layout (True = attend).
        predict_index: (B, T) int64, the packed token whose hidden state predicts ``completion_ids[b, t]``
            (the last prompt token for t = 0; masked positions point there too).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    slot: torch.Tensor
    allowed: torch.Tensor
    predict_index: torch.Tensor

    @property
    def group_length(self) -> int:
        """L, the longest packed group in tokens."""
        return self.allowed.shape[-1]


def pack_groups(batch: RolloutBatch, num_generations: int, sliding_window: Optional[int] = None) -> PackedGroups:
    """Pack ``batch`` (B = groups × G rows, contiguous groups sharing one prompt) by groups.

    Raises:
        ValueError: B is not a multiple of ``num_generations``, or rows of a group have different prompts.
    """
    rows, T = batch.completion_ids.shape
    G = num_generations
    if G < 1 or rows % G:
        raise ValueError(f"num_generations must divide the batch's {rows} rows, got {G}")
    device = batch.completion_ids.device
    lengths = batch.completion_mask.sum(1).tolist()
    ids, positions, seq_ids, starts, prompt_ends = [], [], [], [], []
    offset = 0
    for group in range(rows // G):
        first = group * G
        prompt_mask = batch.prompt_mask[first].bool()
        same = (batch.prompt_ids[first: first + G] == batch.prompt_ids[first]).all() and \
            (batch.prompt_mask[first: first + G] == batch.prompt_mask[first]).all()
        if not bool(same):
            raise ValueError(f"rows {first}..{first + G - 1} of the batch should share one prompt: pass the "
                             "num_generations the batch was sampled with")
        prompt = batch.prompt_ids[first][prompt_mask]
        P = prompt.numel()
        parts, pos, seq, row_starts = [prompt], [torch.arange(P, device=device)], [torch.full((P,), PROMPT)], []
        length = P
        for row in range(first, first + G):
            n = max(int(lengths[row]) - 1, 0)  # the last completion token predicts nothing
            row_starts.append(offset + length)
            parts.append(batch.completion_ids[row, :n])
            pos.append(P + torch.arange(n, device=device))
            seq.append(torch.full((n,), row - first))
            length += n
        ids.append(torch.cat(parts))
        positions.append(torch.cat(pos))
        seq_ids.append(torch.cat(seq))
        starts.append(row_starts)
        prompt_ends.append(offset + P - 1)
        offset += length
    group_length = max(x.numel() for x in ids)
    slot = torch.cat([group * group_length + torch.arange(x.numel()) for group, x in enumerate(ids)]).to(device)
    layout_seq = torch.full((len(ids), group_length), PAD_SLOT, dtype=torch.long)
    layout_pos = torch.zeros((len(ids), group_length), dtype=torch.long)
    for group, (seq, pos) in enumerate(zip(seq_ids, positions)):
        layout_seq[group, : seq.numel()] = seq
        layout_pos[group, : pos.numel()] = pos.cpu()
    predict = torch.tensor([prompt_ends[row // G] for row in range(rows)])[:, None].repeat(1, T)
    for row in range(rows):
        n = int(lengths[row])
        if n > 1:
            predict[row, 1:n] = starts[row // G][row % G] + torch.arange(n - 1)
    return PackedGroups(torch.cat(ids)[None], torch.cat(positions)[None], slot,
                        shared_prefix_mask(layout_seq, layout_pos, sliding_window).to(device), predict.to(device))


def shared_prefix_mask(seq: torch.Tensor, pos: torch.Tensor, sliding_window: Optional[int] = None) -> torch.Tensor:
    """(groups, 1, L, L) bool: query i sees key j <= i (packed order) that is a prompt token or a token of
    its own completion, and, with a sliding window, lies fewer than ``sliding_window`` positions back.

    Args:
        seq: (groups, L) int64, -1 on prompt tokens, the completion's index in its group, -2 on padding.
        pos: (groups, L) int64 positions, on ``seq``'s device. Padding rows see themselves, so no softmax runs
            over nothing.

    The mask is made on ``seq``'s device.
    """
    L = seq.shape[1]
    idx = torch.arange(L, device=seq.device)
    seq_q, seq_k = seq[:, :, None], seq[:, None, :]
    allowed = ((idx[None, :] <= idx[:, None])[None] & ((seq_k == PROMPT) | (seq_k == seq_q))
               & (seq_k != PAD_SLOT) & (seq_q != PAD_SLOT))
    if sliding_window:
        allowed &= pos[:, :, None] - pos[:, None, :] < sliding_window
    allowed |= torch.eye(L, dtype=torch.bool, device=seq.device)[None]
    return allowed[:, None]


def packed_hidden_states(decoder: DecoderLM, packed: PackedGroups, checkpoint: bool = False) -> torch.Tensor:
    """(1, N, H) last hidden states of the packed tokens (see :func:`pack_groups`)."""
    groups, L = packed.allowed.shape[0], packed.group_length

    def attend(index, q, k, v):
        def to_groups(x):  # (1, heads, N, d) -> (groups, heads, L, d); padding slots hold zeros
            heads, d = x.shape[1], x.shape[-1]
            out = x.new_zeros(groups * L, heads, d).index_copy(0, packed.slot, x[0].transpose(0, 1))
            return out.view(groups, L, heads, d).transpose(1, 2)

        out = sdpa(to_groups(q), to_groups(k), to_groups(v), packed.allowed)  # (groups, heads, L, d)
        out = out.transpose(1, 2).reshape(groups * L, out.shape[1], -1).index_select(0, packed.slot)
        return out.transpose(0, 1)[None]

    return decoder.hidden_states(packed.input_ids, packed.position_ids, attend, checkpoint=checkpoint)


def shared_prefix_completion_hidden_states(decoder: DecoderLM, batch: RolloutBatch, num_generations: int,
                                           checkpoint: bool = False) -> torch.Tensor:
    """(B, T, H) hidden states predicting ``batch.completion_ids`` (position t predicts token t), from one
    shared-prefix packed forward; values at masked positions are those of the prompt's last token.

    Raises:
        ValueError: as :func:`pack_groups`.
    """
    packed = pack_groups(batch, num_generations, decoder.sliding_window)
    hidden = packed_hidden_states(decoder, packed, checkpoint)[0]
    return hidden[packed.predict_index]
