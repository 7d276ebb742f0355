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
