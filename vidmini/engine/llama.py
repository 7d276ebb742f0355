"""A Llama decoder stack run explicitly: the layers are transformers' `LlamaDecoderLayer` modules (for their
weights and names), the forward is ours, so that keys/values are handed back and cached where we choose.

`tests/test_llama_layers.py` checks this forward against transformers' own layer forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb

try:  # optional: flash-attention 2 on CUDA
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    impl: str = "sdpa",
) -> torch.Tensor:
    """(B, H, T, D) queries over (B, Hkv, S, D) keys/values; `mask` (bool, True = attend) broadcasts to
    (B, H, T, S). With `causal` and no mask, query i sees keys up to S - T + i (bottom-right alignment)."""
    t, s = q.shape[2], k.shape[2]
    if impl == "flash_attention_2" and mask is None and q.is_cuda and flash_attn_func is not None:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    if causal and mask is None and t > 1 and t != s:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        causal = False
    groups = q.shape[1] // k.shape[1]
    if impl == "eager":
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal and t > 1:
            scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    if groups > 1 and mask is not None and mask.dim() == 2:
        # SDPA's GQA path does not take a mask on every backend. Fold each key/value head's query heads into
        # its query rows instead (head h reads kv head h // groups), so keys/values are never repeated.
        b, h, _, d = q.shape
        folded = q.reshape(b, h // groups, groups * t, d)
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.repeat(groups, 1))
        return out.reshape(b, h, t, d)
    if groups > 1 and mask is not None:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        groups = 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and t > 1, enable_gqa=groups > 1
    )


def project_qkv(
    layer: LlamaDecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized input → rotated queries and keys, values; each (B, heads, T, head_dim)."""
    attn = layer.self_attn
    b, t, _ = x.shape
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def finish_layer(layer: LlamaDecoderLayer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Output projection, residual, MLP block."""
    b, _, t, _ = attn_out.shape
    x = x + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, t, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


@dataclass
class KVCache:
    """Preallocated keys/values for a stack of layers: (layers, B, Hkv, capacity, D); `length` filled."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(
        cls, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> KVCache:
        shape = (num_layers, batch, kv_heads, capacity, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def ensure_capacity(self, needed: int) -> None:
        """Grow (doubling) when `needed` positions would not fit; keeps what is filled."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        shape = (*self.keys.shape[:3], new_cap, self.keys.shape[4])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)


def run_stack(
    layers: nn.ModuleList,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache,
    impl: str = "sdpa",
) -> torch.Tensor:
    """Causal pass of `x` (B, T, d) after the `cache.length` cached positions; appends to the cache."""
    start, t = cache.length, x.shape[1]
    cache.ensure_capacity(start + t)
    for i, layer in enumerate(layers):
        q, k, v = project_qkv(layer, x, cos, sin)
        cache.keys[i, :, :, start : start + t] = k
        cache.values[i, :, :, start : start + t] = v
        keys = cache.keys[i, :, :, : start + t]
        values = cache.values[i, :, :, : start + t]
        x = finish_layer(layer, x, attention(q, keys, values, None, causal=True, impl=impl))
    cache.length = start + t
    return x


def run_step(
    layers: nn.ModuleList,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    caches: list[KVCache],
    impl: str = "sdpa",
) -> torch.Tensor:
    """One new position for each of B sequences: row b of `x` (B, 1, d), with its rotary tables row b of
    `cos`/`sin`, runs after the `caches[b].length` positions of its own (batch-1) cache and is appended to it.
    The dense parts (norms, projections, MLP) run batched over the B rows; attention runs per sequence over its
    own cache, the same `attention` call `run_stack` makes for one sequence's one new position."""
    if x.shape[0] != len(caches) or x.shape[1] != 1:
        raise ValueError(f"run_step takes one position per sequence: x {tuple(x.shape)}, {len(caches)} caches")
    for cache in caches:
        if cache.keys.shape[1] != 1:
            raise ValueError("run_step needs one batch-1 cache per sequence")
        cache.ensure_capacity(cache.length + 1)
    for i, layer in enumerate(layers):
        q, k, v = project_qkv(layer, x, cos, sin)
        outs = []
        for b, cache in enumerate(caches):
            s = cache.length
            cache.keys[i, :, :, s : s + 1] = k[b : b + 1]
            cache.values[i, :, :, s : s + 1] = v[b : b + 1]
            keys = cache.keys[i, :, :, : s + 1]
            values = cache.values[i, :, :, : s + 1]
            outs.append(attention(q[b : b + 1], keys, values, None, causal=True, impl=impl))
        x = finish_layer(layer, x, torch.cat(outs))
    for cache in caches:
        cache.length += 1
    return x


@dataclass
class DecodePool:
    """The keys/values of a batch of answers side by side, (layers, B, Hkv, capacity, D), row b filled to
    `lengths[b]`: a decode step then writes and attends for the whole batch with one call per layer, instead of
    one per answer (`run_step`'s loop), which is what a step of a small model on a CPU spends its time on.

    The rows are copies: `gather` takes them from the answers' own batch-1 caches, `write_back` returns the
    positions added since (`base[b]` on) to each cache, which is then whole again (its `length` is set). The
    caches' own `length`s are not advanced while their answers decode here."""

    keys: torch.Tensor
    values: torch.Tensor
    lengths: list[int]
    base: list[int]
    caches: list[KVCache]

    @classmethod
    def gather(cls, caches: list[KVCache], room: int) -> DecodePool:
        """A pool of `caches` (batch-1 each) with `room` positions beyond the longest."""
        layers, _, kv_heads, _, head_dim = caches[0].keys.shape
        lengths = [c.length for c in caches]
        shape = (layers, len(caches), kv_heads, max(lengths) + room, head_dim)
        keys = caches[0].keys.new_zeros(shape)
        values = caches[0].values.new_zeros(shape)
        for b, (cache, n) in enumerate(zip(caches, lengths, strict=True)):
            keys[:, b, :, :n] = cache.keys[:, 0, :, :n]
            values[:, b, :, :n] = cache.values[:, 0, :, :n]
        return cls(keys, values, lengths, list(lengths), list(caches))

    @staticmethod
    def nbytes_for(caches: list[KVCache], room: int) -> int:
        """What `gather(caches, room)` would allocate."""
        layers, _, kv_heads, _, head_dim = caches[0].keys.shape
        positions = len(caches) * (max(c.length for c in caches) + room)
        return 2 * layers * kv_heads * head_dim * positions * caches[0].keys.element_size()

    def ensure_capacity(self, needed: int) -> None:
        if needed <= self.keys.shape[3]:
            return
        longest = max(self.lengths)
        shape = (*self.keys.shape[:3], max(needed, 2 * self.keys.shape[3]), self.keys.shape[4])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(shape)
            new[:, :, :, :longest] = old[:, :, :, :longest]
            setattr(self, name, new)

    def write_back(self, rows: list[int] | None = None) -> None:
        """Copy row b's positions from `base[b]` on into its own cache (for each b in `rows`, default all)."""
        for b in range(len(self.caches)) if rows is None else rows:
            cache, start, end = self.caches[b], self.base[b], self.lengths[b]
            cache.ensure_capacity(end)
            if end > start:
                cache.keys[:, 0, :, start:end] = self.keys[:, b, :, start:end]
                cache.values[:, 0, :, start:end] = self.values[:, b, :, start:end]
            cache.length = self.base[b] = end


def run_step_pooled(
    layers: nn.ModuleList,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pool: DecodePool,
) -> torch.Tensor:
    """One new position for each row of `pool`: row b of `x` (B, 1, d), rotated by row b of `cos`/`sin` (its
    position is `pool.lengths[b]`), is appended to row b and attends over that row's positions only (a mask
    hides the rest of the padded rows). Per layer one write and one attention call for the whole batch."""
    b = x.shape[0]
    if b != len(pool.lengths) or x.shape[1] != 1:
        raise ValueError(f"run_step_pooled takes one position per row: x {tuple(x.shape)}, {len(pool.lengths)} rows")
    pool.ensure_capacity(max(pool.lengths) + 1)
    span = max(pool.lengths) + 1
    device = x.device
    rows = torch.arange(b, device=device)
    at = torch.tensor(pool.lengths, device=device)
    mask = (torch.arange(span, device=device)[None] <= at[:, None])[:, None, None]  # (B, 1, 1, span)
    for i, layer in enumerate(layers):
        q, k, v = project_qkv(layer, x, cos, sin)
        keys, values = pool.keys[i], pool.values[i]
        keys[rows, :, at] = k[:, :, 0]
        values[rows, :, at] = v[:, :, 0]
        kv_heads, head_dim = keys.shape[1], keys.shape[3]
        groups = q.shape[1] // kv_heads
        folded = q.reshape(b, kv_heads, groups, head_dim)  # a KV head's query heads as its query rows
        out = F.scaled_dot_product_attention(folded, keys[:, :, :span], values[:, :, :span], attn_mask=mask)
        x = finish_layer(layer, x, out.reshape(b, kv_heads * groups, 1, head_dim))
    pool.lengths = [n + 1 for n in pool.lengths]
    return x
