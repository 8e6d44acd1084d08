"""Rollout on the policy's own weights, with each prompt's KV cache computed once and shared by its G samples.

Prefill runs the P distinct prompts once. Decoding runs the P·G samples in one batch: every attention
call scores the queries of a group's G samples against that group's prompt keys in one batched matmul
(no per-sample copy of the prompt cache) and against each sample's own generated keys, held in a static
cache written by index; the two parts are merged in one softmax. Samples that stop leave the batch: once
a quarter of the batch has stopped, the batch and its caches are compacted (and groups whose samples all
stopped drop their prompt cache), so finished samples stop costing compute. On CUDA each decode step is
replayed from a CUDA graph, captured again only when compaction changes the batch. The sampler records
each sampled token's log-prob, and the vocabulary mean of the log-probs (ROVER's value), under
softmax(logits / temperature), so on-policy steps need no extra forward. Every cache lives only inside
``generate``: it is freed before the trainer's forward and backward.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from rlfuse.engine.decoder import DecoderLM, LayerKV, causal_attend, collect_kv
from rlfuse.engine.rollout import RolloutBatch, left_pad, stop_token_ids


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False) -> torch.Tensor:
    """Next tokens (rows,) from float32 logits (rows, V): argmax, or sampling after top-k and top-p filtering."""
    if greedy:
        return logits.argmax(-1)
    return sample_from_log_probs(torch.log_softmax(logits / temperature, dim=-1), top_k, top_p)


def sample_from_log_probs(log_probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                          greedy: bool = False) -> torch.Tensor:
    """Next tokens (rows,) from float32 log-probs (rows, V) of softmax(logits / temperature), which the
    sampler has already formed to record them: no second softmax over the vocabulary."""
    if greedy:
        return log_probs.argmax(-1)
    z = log_probs
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, -1)  # renormalized after top-k
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
    return inverse_cdf_sample(z.exp())


def inverse_cdf_sample(weights: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights`` (rows, V) float32 (non-negative, not necessarily normalized), drawn
    with probability proportional to its weight: the first index whose running sum exceeds a uniform draw
    on [0, row sum).

    Exact in distribution up to float32 rounding of the running sum, and on the CPU about ten times faster
    than ``torch.multinomial``, whose exponential draw over the whole vocabulary took a tenth of a rollout's
    time. A zero-weight index is never drawn (its running sum equals its predecessor's).
    """
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    drawn = torch.searchsorted(cdf, torch.rand_like(total) * total, right=True).squeeze(-1)
    overflow = drawn >= weights.shape[-1]  # rand * total rounded up to total: the last index with weight
    if overflow.any():
        last = weights.shape[-1] - 1 - (weights > 0).flip(-1).int().argmax(-1)
        drawn = torch.where(overflow, last, drawn)
    return drawn


COMPACT_BELOW = 0.75  # compact the decode batch once fewer than this fraction of its rows still run


@dataclass
class DecodeState:
    """The decode batch: b rows (a subset of the P·G samples) of n groups. Lists hold one tensor per layer.

    Attributes:
        prompt_k, prompt_v: (n, kv_heads, P, d) each group's prompt cache, read by all its rows.
        prompt_bias: (n, 1, 1, P) float32, 0 on real prompt tokens and -inf on padding.
        gen_k, gen_v: (b, kv_heads, max_new_tokens, d) each row's own keys and values, written by index.
        slot: (b,) int64, each row's place in the (n · G) query layout of the prompt attention.
        rows: (b,) int64, each row's sample index in the returned batch.
        prompt_len: (b,) int64, real prompt tokens of each row (its first generated position).
    """

    prompt_k: List[torch.Tensor]
    prompt_v: List[torch.Tensor]
    prompt_bias: torch.Tensor
    gen_k: List[torch.Tensor]
    gen_v: List[torch.Tensor]
    slot: torch.Tensor
    rows: torch.Tensor
    prompt_len: torch.Tensor

    def keep(self, keep_rows: torch.Tensor, groups: int) -> "DecodeState":
        """The state with only the batch rows where ``keep_rows`` (b,) is True, and only their groups."""
        slot = self.slot[keep_rows]
        group_ids, new_group = torch.unique(slot // groups, return_inverse=True)
        take = lambda xs, index: [x[index] for x in xs]  # noqa: E731
        return DecodeState(take(self.prompt_k, group_ids), take(self.prompt_v, group_ids), self.prompt_bias[group_ids],
                           take(self.gen_k, keep_rows), take(self.gen_v, keep_rows), new_group * groups + slot % groups,
                           self.rows[keep_rows], self.prompt_len[keep_rows])


class SharedPrefixSampler:
    """A :class:`rlfuse.engine.rollout.Rollout` over :class:`DecoderLM`; returned batches carry ``logps``
    and ``vocab_mean`` (B, T) float32 of the sampled tokens, and ``truncated`` (B,) bool.

    Args:
        model: the transformers causal LM being trained (its parameters are used in place).
        tokenizer: its tokenizer (pad and stop tokens).
        top_k, top_p: sampling filters (0 and 1.0 disable them); recorded log-probs are those of the
            unfiltered softmax(logits / temperature), the policy that training scores.
        cuda_graphs: replay decode steps from CUDA graphs on a CUDA device (falls back to eager, with a
            warning, if capture fails).
        stop_pattern: a regular expression; a completion also ends, that token included, at the first
            newline-bearing token after which the text of its last ``STOP_WINDOW`` tokens, up to and including
            the last newline, ends with a match (``$``-anchored search), like vLLM's ``stop`` strings but a
            pattern. None: stop tokens only. Such a completion is not ``truncated``.
    """

    STOP_WINDOW = 32  # tokens of text the stop pattern sees

    def __init__(self, model, tokenizer, top_k: int = 0, top_p: float = 1.0, cuda_graphs: bool = True,
                 stop_pattern: Optional[str] = None):
        self.model, self.tokenizer, self.top_k, self.top_p = model, tokenizer, top_k, top_p
        self.decoder = DecoderLM(model)
        self.stop_ids = torch.tensor(stop_token_ids(model, tokenizer), dtype=torch.long)
        self.cuda_graphs = cuda_graphs
        self.stop_pattern = None if stop_pattern is None else re.compile(f"(?:{stop_pattern})$")
        self._newline_ids = None
        if stop_pattern is not None:  # only tokens that hold a newline can end a match
            vocab = len(tokenizer)
            pieces = tokenizer.batch_decode([[i] for i in range(vocab)])
            self._newline_ids = torch.tensor([i for i, text in enumerate(pieces) if "\n" in text], dtype=torch.long)

    @torch.no_grad()
    def generate(self, prompts: Sequence[List[int]], num_generations: int, max_new_tokens: int,
                 temperature: float, greedy: bool = False) -> RolloutBatch:
        """Sample ``num_generations`` completions per prompt; see :class:`rlfuse.engine.rollout.Rollout`.

        Raises:
            ValueError: no prompts, non-positive lengths, a ``temperature`` not above 0 (pass ``greedy=True``
                for argmax decoding), or prompt + completion beyond the sliding window.
        """
        if not prompts or max_new_tokens < 1 or num_generations < 1:
            raise ValueError("need at least one prompt, max_new_tokens >= 1 and num_generations >= 1")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}; pass greedy=True for argmax decoding "
                             "(the recorded log-probs are those of softmax(logits / temperature))")
        device = next(self.model.parameters()).device
        ids, mask = (t.to(device) for t in left_pad(prompts, self.tokenizer.pad_token_id))
        window = self.decoder.sliding_window
        if window and ids.shape[1] + max_new_tokens > window:
            raise ValueError(f"prompt + completion ({ids.shape[1] + max_new_tokens}) exceeds the sliding window {window}")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(ids, mask, num_generations, max_new_tokens, temperature, greedy, device)
        finally:
            self.model.train(was_training)

    def _prefill(self, ids, mask):
        store: List[Optional[LayerKV]] = [None] * len(self.decoder.layers)
        attend = collect_kv(store, causal_attend(mask.bool(), self.decoder.sliding_window))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.decoder.hidden_states(ids, positions, attend)
        return store, self.decoder.logits(hidden[:, -1])

    def _initial_state(self, store, mask, groups, max_new_tokens, device) -> DecodeState:
        rows = mask.shape[0] * groups
        shape = (rows, self.decoder.num_kv_heads, max_new_tokens, self.decoder.head_dim)
        dtype = store[0].keys.dtype
        bias = torch.zeros(mask.shape, device=device).masked_fill(~mask.bool(), float("-inf"))[:, None, None]
        arange = torch.arange(rows, device=device)
        return DecodeState([kv.keys for kv in store], [kv.values for kv in store], bias,
                           # zeros, not empty: the static-shape step reads unwritten slots (masked out, but
                           # garbage NaN times a -inf bias is still NaN)
                           [torch.zeros(shape, device=device, dtype=dtype) for _ in store],
                           [torch.zeros(shape, device=device, dtype=dtype) for _ in store],
                           arange, arange, mask.sum(-1).repeat_interleave(groups))

    def _generate(self, ids, mask, groups, max_new_tokens, temperature, greedy, device) -> RolloutBatch:
        rows = ids.shape[0] * groups
        store, logits = self._prefill(ids, mask)
        logits = logits.repeat_interleave(groups, dim=0)
        state = self._initial_state(store, mask, groups, max_new_tokens, device)
        del store
        pad = self.tokenizer.pad_token_id
        tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        logps = torch.zeros(rows, max_new_tokens, device=device)
        vocab_mean = torch.zeros(rows, max_new_tokens, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        stop_ids = self.stop_ids.to(device)
        newline_ids = None if self._newline_ids is None else self._newline_ids.to(device)  # once, not per step
        step_fn = self._step_function(state, groups, device)
        for step in range(max_new_tokens):
            row_ids = state.rows
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            new = sample_from_log_probs(log_probs, self.top_k, self.top_p, greedy)
            new = torch.where(finished[row_ids], pad, new)
            tokens[row_ids, step] = new
            logps[row_ids, step] = log_probs.gather(-1, new[:, None])[:, 0]
            vocab_mean[row_ids, step] = log_probs.mean(-1)
            lengths[row_ids] += (~finished[row_ids]).long()
            finished[row_ids] |= torch.isin(new, stop_ids)
            if self.stop_pattern is not None:
                self._stop_at_pattern(tokens, new, row_ids, finished, step, newline_ids)
            running = ~finished[row_ids]
            num_running = int(running.sum())
            if step + 1 == max_new_tokens or num_running == 0:
                break
            if num_running < COMPACT_BELOW * row_ids.numel():  # one compaction per quarter of the batch
                state, new = state.keep(running, groups), new[running]
                step_fn = self._step_function(state, groups, device)
            logits = step_fn(new, step)
        used = int(lengths.max())
        completion_mask = torch.arange(used, device=device)[None, :] < lengths[:, None]
        completion_ids = torch.where(completion_mask, tokens[:, :used], pad)
        return RolloutBatch(ids.repeat_interleave(groups, 0), mask.repeat_interleave(groups, 0), completion_ids,
                            completion_mask, torch.where(completion_mask, logps[:, :used], 0.0),
                            torch.where(completion_mask, vocab_mean[:, :used], 0.0),
                            ~finished)  # not finished: neither a stop token nor the stop pattern ended it

    def _stop_at_pattern(self, tokens, new, row_ids, finished, step, newline_ids) -> None:
        """Mark finished the rows of ``row_ids`` whose token ``new`` at ``step`` completes a stop-pattern match."""
        candidates = row_ids[~finished[row_ids] & torch.isin(new, newline_ids)].tolist()
        if not candidates:
            return
        start = max(0, step + 1 - self.STOP_WINDOW)
        texts = self.tokenizer.batch_decode(tokens[candidates, start: step + 1].tolist())
        for row, text in zip(candidates, texts):
            if self.stop_pattern.search(text[: text.rfind("\n") + 1]):
                finished[row] = True

    def _step_function(self, state: DecodeState, groups: int, device):
        """``fn(tokens (b,), step) -> logits (b, V)`` float32: one decode step of ``state``'s batch; a CUDA
        graph replay on CUDA when enabled, otherwise eager (own keys read only up to ``step``)."""
        if device.type == "cuda" and self.cuda_graphs:
            return GraphedDecodeStep(self, state, groups)
        return lambda new, step: self.decode_step(state, groups, new, torch.tensor([step], device=device), step + 1)

    def decode_step(self, state: DecodeState, groups: int, new: torch.Tensor, step: torch.Tensor,
                    own_len: Optional[int] = None) -> torch.Tensor:
        """Logits (b, V) float32 after feeding ``new`` (b,) at generated index ``step`` ((1,) int64 tensor).

        ``own_len`` limits the own-key read to the first ``own_len`` slots; None reads all of them under a
        mask (the static shapes a CUDA graph needs).
        """
        positions = (state.prompt_len + step)[:, None]
        attend = self._decode_attend(state, groups, step, own_len)
        hidden = self.decoder.hidden_states(new[:, None], positions, attend)
        return self.decoder.logits(hidden[:, -1])

    def _decode_attend(self, state: DecodeState, groups: int, step: torch.Tensor, own_len: Optional[int]):
        """Attention of one decode step: shared prompt keys per group plus each sample's own keys."""
        heads, kv_heads = self.decoder.num_heads, self.decoder.num_kv_heads
        rep, scale = heads // kv_heads, 1.0 / math.sqrt(self.decoder.head_dim)
        n_groups = state.prompt_bias.shape[0]
        layout = n_groups * groups
        if own_len is None:  # static shapes: every own slot is read, later ones masked out
            own_bias = torch.zeros(state.gen_k[0].shape[2], device=step.device)
            own_bias = own_bias.masked_fill(torch.arange(own_bias.numel(), device=step.device) > step, float("-inf"))

        def to_groups(x):  # (b, kv_heads, rep, n) -> (groups, kv_heads, G·rep, n): a group's rows share a cache
            x = x.new_zeros(layout, *x.shape[1:]).index_copy(0, state.slot, x)
            return x.view(n_groups, groups, kv_heads, rep, -1).transpose(1, 2).reshape(n_groups, kv_heads, groups * rep, -1)

        def from_groups(x):  # the inverse, for this batch's rows
            x = x.view(n_groups, kv_heads, groups, rep, -1).transpose(1, 2).reshape(layout, kv_heads, rep, -1)
            return x.index_select(0, state.slot)

        def attend(index, q, k, v):
            b = q.shape[0]
            state.gen_k[index].index_copy_(2, step, k.to(state.gen_k[index].dtype))
            state.gen_v[index].index_copy_(2, step, v.to(state.gen_v[index].dtype))
            qs = q[:, :, 0].view(b, kv_heads, rep, -1)
            s_prompt = (to_groups(qs) @ state.prompt_k[index].transpose(-1, -2)).float() * scale + state.prompt_bias
            keys, values = state.gen_k[index], state.gen_v[index]
            if own_len is not None:
                keys, values = keys[:, :, :own_len], values[:, :, :own_len]
            s_own = (qs @ keys.transpose(-1, -2)).float() * scale
            if own_len is None:
                s_own = s_own + own_bias
            prompt_len = s_prompt.shape[-1]
            probs = torch.softmax(torch.cat([from_groups(s_prompt), s_own], dim=-1), dim=-1).to(q.dtype)
            out = from_groups(to_groups(probs[..., :prompt_len]) @ state.prompt_v[index])
            out = out + probs[..., prompt_len:] @ values
            return out.reshape(b, heads, 1, -1)

        return attend


class GraphedDecodeStep:
    """One decode step of a fixed :class:`DecodeState` captured in a CUDA graph and replayed per token.

    The first call runs eagerly (warming up on a side stream) and captures; later calls copy the new
    tokens and step index into the graph's static inputs and replay it, returning the graph's own logits
    buffer (overwritten by the next call). If capture fails, every call runs eagerly and a warning says why.
    """

    def __init__(self, sampler: SharedPrefixSampler, state: DecodeState, groups: int):
        self.sampler, self.state, self.groups = sampler, state, groups
        self.graph = None
        self.failed = False

    def _eager(self, new, step):
        return self.sampler.decode_step(self.state, self.groups, new, step)

    def __call__(self, new: torch.Tensor, step: int) -> torch.Tensor:
        device = new.device
        if self.graph is not None:
            self.static_new.copy_(new)
            self.static_step.fill_(step)
            self.graph.replay()
            return self.static_logits  # valid until the next call, which the decode loop reads it before
        step_t = torch.tensor([step], device=device)
        if self.failed:
            return self._eager(new, step_t)
        self.static_new, self.static_step = new.clone(), step_t
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream; it computes this step's logits
            logits = self._eager(self.static_new, self.static_step)
        torch.cuda.current_stream(device).wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_logits = self._eager(self.static_new, self.static_step)
            self.graph = graph
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager decoding
            self.failed = True
            warnings.warn(f"CUDA graph capture of the decode step failed ({error}); decoding eagerly", stacklevel=2)
        return logits
