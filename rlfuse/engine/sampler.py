"""Rollout on the policy's own weights, with each prompt's KV cache computed once and shared by its G samples.

Prefill runs the P distinct prompts once. Decoding runs the P·G samples in one batch: every attention
call scores the queries of a group's G samples against that group's prompt keys in one batched matmul
(no per-sample copy of the prompt cache) and against each sample's own generated keys, held in a static
cache written by index; the two parts are merged in one softmax. Groups whose samples have all stopped
leave the batch. The sampler records each sampled token's log-prob, and the vocabulary mean of the
log-probs (ROVER's value), under softmax(logits / temperature), so on-policy steps need no extra forward.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from rlfuse.engine.decoder import DecoderLM, LayerKV, causal_padding_mask, collect_kv, sdpa
from rlfuse.engine.rollout import RolloutBatch, left_pad, stop_token_ids


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False) -> torch.Tensor:
    """Next tokens (rows,) from float32 logits (rows, V): argmax, or sampling after top-k and top-p filtering."""
    if greedy:
        return logits.argmax(-1)
    z = logits / temperature
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_z, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_z, -1) > top_p  # keep the smallest set reaching top_p
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(z, -1), 1).squeeze(-1)


class SharedPrefixSampler:
    """A :class:`rlfuse.engine.rollout.Rollout` over :class:`DecoderLM`; returned batches carry ``logps``
    and ``vocab_mean`` (B, T) float32 of the sampled tokens.

    Args:
        model: the transformers causal LM being trained (its parameters are used in place).
        tokenizer: its tokenizer (pad and stop tokens).
        top_k, top_p: sampling filters (0 and 1.0 disable them); recorded log-probs are those of the
            unfiltered softmax(logits / temperature), the policy that training scores.
    """

    def __init__(self, model, tokenizer, top_k: int = 0, top_p: float = 1.0):
        self.model, self.tokenizer, self.top_k, self.top_p = model, tokenizer, top_k, top_p
        self.decoder = DecoderLM(model)
        self.stop_ids = torch.tensor(stop_token_ids(model, tokenizer), dtype=torch.long)

    @torch.no_grad()
    def generate(self, prompts: Sequence[List[int]], num_generations: int, max_new_tokens: int,
                 temperature: float, greedy: bool = False) -> RolloutBatch:
        """Sample ``num_generations`` completions per prompt; see :class:`rlfuse.engine.rollout.Rollout`.

        Raises:
            ValueError: no prompts, non-positive lengths, or prompt + completion beyond the sliding window.
        """
        if not prompts or max_new_tokens < 1 or num_generations < 1:
            raise ValueError("need at least one prompt, max_new_tokens >= 1 and num_generations >= 1")
        device = next(self.model.parameters()).device
        groups = num_generations
        ids, mask = (t.to(device) for t in left_pad(prompts, self.tokenizer.pad_token_id))
        window = self.decoder.sliding_window
        if window and ids.shape[1] + max_new_tokens > window:
            raise ValueError(f"prompt + completion ({ids.shape[1] + max_new_tokens}) exceeds the sliding window {window}")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(ids, mask, groups, max_new_tokens, temperature, greedy, device)
        finally:
            self.model.train(was_training)

    def _prefill(self, ids, mask):
        store: List[Optional[LayerKV]] = [None] * len(self.decoder.layers)
        allowed = causal_padding_mask(mask.bool(), self.decoder.sliding_window)
        attend = collect_kv(store, lambda index, q, k, v: sdpa(q, k, v, allowed))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.decoder.hidden_states(ids, positions, attend)
        return store, self.decoder.logits(hidden[:, -1])

    def _generate(self, ids, mask, groups, max_new_tokens, temperature, greedy, device) -> RolloutBatch:
        num_prompts, rows = ids.shape[0], ids.shape[0] * groups
        store, logits = self._prefill(ids, mask)
        logits = logits.repeat_interleave(groups, dim=0)
        pad = self.tokenizer.pad_token_id
        tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        logps = torch.zeros(rows, max_new_tokens, device=device)
        vocab_mean = torch.zeros(rows, max_new_tokens, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        shape = (rows, self.decoder.num_kv_heads, max_new_tokens, self.decoder.head_dim)
        dtype = store[0].keys.dtype
        gen_k = [torch.empty(shape, device=device, dtype=dtype) for _ in store]
        gen_v = [torch.empty(shape, device=device, dtype=dtype) for _ in store]
        prompt_k, prompt_v = [kv.keys for kv in store], [kv.values for kv in store]
        prompt_real, prompt_len = mask.bool(), mask.sum(-1)
        active = torch.arange(num_prompts, device=device)  # groups still decoding, in cache order
        stop_ids = self.stop_ids.to(device)
        for step in range(max_new_tokens):
            row_ids = (active[:, None] * groups + torch.arange(groups, device=device)).reshape(-1)
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            new = sample_tokens(logits, temperature, self.top_k, self.top_p, greedy)
            new = torch.where(finished[row_ids], pad, new)
            tokens[row_ids, step] = new
            logps[row_ids, step] = log_probs.gather(-1, new[:, None])[:, 0]
            vocab_mean[row_ids, step] = log_probs.mean(-1)
            lengths[row_ids] += (~finished[row_ids]).long()
            finished[row_ids] |= torch.isin(new, stop_ids)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            keep = ~finished[row_ids].view(-1, groups).all(-1)
            if not bool(keep.all()):  # drop groups whose samples all stopped: one compaction per change
                active, new, row_ids = active[keep], new.view(-1, groups)[keep].reshape(-1), row_ids.view(-1, groups)[keep].reshape(-1)
                kept_rows = keep.repeat_interleave(groups)
                prompt_k, prompt_v = [k[keep] for k in prompt_k], [v[keep] for v in prompt_v]
                gen_k, gen_v = [k[kept_rows] for k in gen_k], [v[kept_rows] for v in gen_v]
                prompt_real, prompt_len = prompt_real[keep], prompt_len[keep]
            positions = (prompt_len.repeat_interleave(groups) + step)[:, None]
            attend = self._decode_attend(prompt_k, prompt_v, gen_k, gen_v, prompt_real, groups, step)
            hidden = self.decoder.hidden_states(new[:, None], positions, attend)
            logits = self.decoder.logits(hidden[:, -1])
        used = int(lengths.max())
        completion_mask = torch.arange(used, device=device)[None, :] < lengths[:, None]
        completion_ids = torch.where(completion_mask, tokens[:, :used], pad)
        return RolloutBatch(ids.repeat_interleave(groups, 0), mask.repeat_interleave(groups, 0), completion_ids,
                            completion_mask, torch.where(completion_mask, logps[:, :used], 0.0),
                            torch.where(completion_mask, vocab_mean[:, :used], 0.0))

    def _decode_attend(self, prompt_k, prompt_v, gen_k, gen_v, prompt_real, groups, step):
        """Attention of one decode step: shared prompt keys per group plus each sample's own keys."""
        heads, kv_heads = self.decoder.num_heads, self.decoder.num_kv_heads
        rep, scale = heads // kv_heads, 1.0 / math.sqrt(self.decoder.head_dim)

        def attend(index, q, k, v):
            rows = q.shape[0]
            gen_k[index][:, :, step] = k[:, :, 0]
            gen_v[index][:, :, step] = v[:, :, 0]
            n_groups, prompt_len = prompt_k[index].shape[0], prompt_k[index].shape[2]
            # (groups, kv_heads, G·rep, d): the G samples of a group are queries against one prompt cache.
            qg = q[:, :, 0].view(n_groups, groups, kv_heads, rep, -1).permute(0, 2, 1, 3, 4).reshape(
                n_groups, kv_heads, groups * rep, -1)
            s_prompt = (qg @ prompt_k[index].transpose(-1, -2)).float() * scale
            s_prompt = s_prompt.masked_fill(~prompt_real[:, None, None, :], float("-inf"))
            s_prompt = s_prompt.view(n_groups, kv_heads, groups, rep, prompt_len).permute(0, 2, 1, 3, 4).reshape(
                rows, kv_heads, rep, prompt_len)
            qs = q[:, :, 0].view(rows, kv_heads, rep, -1)
            s_own = (qs @ gen_k[index][:, :, : step + 1].transpose(-1, -2)).float() * scale
            probs = torch.softmax(torch.cat([s_prompt, s_own], dim=-1), dim=-1).to(q.dtype)
            p_prompt = probs[..., :prompt_len].reshape(n_groups, groups, kv_heads, rep, prompt_len).permute(
                0, 2, 1, 3, 4).reshape(n_groups, kv_heads, groups * rep, prompt_len)
            out_prompt = (p_prompt @ prompt_v[index]).view(n_groups, kv_heads, groups, rep, -1).permute(
                0, 2, 1, 3, 4).reshape(rows, kv_heads, rep, -1)
            out = out_prompt + probs[..., prompt_len:] @ gen_v[index][:, :, : step + 1]
            return out.reshape(rows, heads, 1, -1)

        return attend
