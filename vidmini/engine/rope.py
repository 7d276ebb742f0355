"""Rotary position embeddings computed from the checkpoint's own rope settings, in either config form.

transformers 4.x writes `rope_theta` plus `rope_scaling` (null, or `{rope_type | type, factor, ...}`); 5.x writes one
`rope_parameters` dict that carries `rope_theta` too. Both are read into one `RopeSpec`, and the frequencies are
computed here rather than by transformers, so that loading the published checkpoint does not depend on how the
installed transformers interprets (or renames) these keys. `tests/engine/test_rope.py` checks the tables against
transformers' own rope functions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3")


class RopeConfigError(ValueError):
    """Rope settings that cannot be used; the message names the key."""


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise RopeConfigError(f"{key} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RopeSpec:
    """One rope recipe: `kind` default (θ only), linear (positions divided by `factor`) or llama3 (Llama 3.1's
    wavelength-dependent scaling of the frequencies)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> RopeSpec:
        """The spec of a config.json dict, 5.x `rope_parameters` first, else 4.x `rope_theta` + `rope_scaling`."""
        if raw.get("rope_parameters") is not None:
            params, where = raw["rope_parameters"], "rope_parameters"
            if not isinstance(params, dict):
                raise RopeConfigError(f"rope_parameters must be an object, got {params!r}")
            theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
            theta_key = "rope_parameters.rope_theta" if "rope_theta" in params else "rope_theta"
        else:
            params, where = raw.get("rope_scaling") or {}, "rope_scaling"
            if not isinstance(params, dict):
                raise RopeConfigError(f"rope_scaling must be an object or null, got {params!r}")
            theta, theta_key = raw.get("rope_theta", 10000.0), "rope_theta"
        kind_key = "rope_type" if "rope_type" in params or "type" not in params else "type"
        kind = params.get(kind_key, "default")
        if kind not in ROPE_TYPES:
            raise RopeConfigError(f"{where}.{kind_key} {kind!r} is not a rope type vidmini implements "
                                  f"({', '.join(ROPE_TYPES)})")
        spec: dict[str, Any] = {"theta": _number(theta, theta_key), "kind": kind}
        if kind in ("linear", "llama3"):
            if "factor" not in params:
                raise RopeConfigError(f"{where}.factor is missing (needed by rope type {kind!r})")
            spec["factor"] = _number(params["factor"], f"{where}.factor")
        if kind == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in params:
                    raise RopeConfigError(f"{where}.{key} is missing (needed by rope type 'llama3')")
                spec[key] = _number(params[key], f"{where}.{key}")
            spec["original_max_position_embeddings"] = int(spec["original_max_position_embeddings"])
            if spec["high_freq_factor"] <= spec["low_freq_factor"]:
                raise RopeConfigError(f"{where}.high_freq_factor must exceed {where}.low_freq_factor")
        return cls(**spec)

    def rope_parameters(self) -> dict[str, Any]:
        """The 5.x form (`rope_parameters`, θ inside)."""
        return {"rope_theta": self.theta, **self._scaling()}

    def legacy_keys(self) -> dict[str, Any]:
        """The 4.x form the published checkpoint has: `rope_theta` and `rope_scaling` (null for default)."""
        scaling = self._scaling()
        return {"rope_theta": self.theta, "rope_scaling": scaling if self.kind != "default" else None}

    def _scaling(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.kind}
        if self.kind in ("linear", "llama3"):
            out["factor"] = self.factor
        if self.kind == "llama3":
            fields = asdict(self)
            out.update({k: fields[k] for k in ("low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")})
        return out

    def inverse_frequencies(self, head_dim: int) -> torch.Tensor:
        """(head_dim / 2,) float32 angular frequencies, scaled as `kind` says."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind == "llama3":
            return self._llama3(inv_freq)
        return inv_freq

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """Long wavelengths divided by `factor`, short ones kept, the band between interpolated smoothly."""
        context = self.original_max_position_embeddings
        low_wavelen = context / self.low_freq_factor
        high_wavelen = context / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        in_band = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for integer positions. The float32 frequencies are a plain attribute, not a buffer: never
    stored in checkpoints, and never rounded by `model.to(torch.bfloat16)`."""

    def __init__(self, spec: RopeSpec, head_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.inv_freq = spec.inverse_frequencies(head_dim)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions → cos, sin of shape (B, T, head_dim) in x's dtype (angles computed in float32)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        table = torch.cat([angles, angles], dim=-1)
        return table.cos().to(x.dtype), table.sin().to(x.dtype)
