"""engine.rope against transformers' own rope code, from either config form.

The expected tables come from transformers: `LlamaRotaryEmbedding` on a `LlamaConfig` that transformers builds
from the keys as a config.json would hold them (its own 4.x → 5.x conversion included), and the registered rope
functions (`ROPE_INIT_FUNCTIONS`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from vidmini.engine.config import LlavaMiniConfig
from vidmini.engine.rope import RopeConfigError, RopeSpec, RotaryEmbedding

SIZES = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 131072}
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
# (rope_theta, rope_scaling) as 4.x config.json files carry them
CASES = {
    "llama-3.1": (500000.0, LLAMA31),
    "llama-3.2-like": (500000.0, {**LLAMA31, "factor": 32.0}),
    "llama3-other-band": (10000.0, {**LLAMA31, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                                    "original_max_position_embeddings": 4096}),
    "linear": (10000.0, {"rope_type": "linear", "factor": 4.0}),
    "default": (10000.0, None),
    "default-theta": (1000000.0, None),
}
POSITIONS = torch.tensor([[0, 1, 2, 100, 2047, 4096, 8191, 8192, 20000, 65535, 131071]])


def legacy(theta: float, scaling: dict | None) -> dict:
    return {**SIZES, "rope_theta": theta, "rope_scaling": scaling}


def modern(theta: float, scaling: dict | None) -> dict:
    return {**SIZES, "rope_parameters": {"rope_theta": theta, **(scaling or {"rope_type": "default"})}}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("form", [legacy, modern])
def test_tables_equal_transformers_from_either_form(name, form):
    keys = form(*CASES[name])
    reference = LlamaRotaryEmbedding(LlamaConfig(**json.loads(json.dumps(keys))))
    ours = RotaryEmbedding(RopeSpec.from_config(keys), SIZES["hidden_size"] // SIZES["num_attention_heads"])
    x = torch.zeros(1)
    for got, want in zip(ours(x, POSITIONS), reference(x, POSITIONS), strict=True):
        assert got.shape == want.shape == (1, POSITIONS.shape[1], 64)
        assert torch.equal(got, want), name


@pytest.mark.parametrize("name", [n for n, (_, s) in CASES.items() if s is not None])
def test_frequencies_equal_the_registered_rope_function(name):
    theta, scaling = CASES[name]
    config = LlamaConfig(**modern(theta, scaling))
    inv_freq, scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    assert scale == 1.0
    assert torch.equal(RopeSpec.from_config(legacy(theta, scaling)).inverse_frequencies(64), inv_freq.float())


def test_llama31_scaling_moves_only_the_long_wavelengths():
    """A fact of the recipe, not of the code: high frequencies are kept, the lowest divided by the factor."""
    plain = RopeSpec(theta=500000.0).inverse_frequencies(128)
    scaled = RopeSpec.from_config(legacy(500000.0, LLAMA31)).inverse_frequencies(128)
    assert torch.equal(scaled[:10], plain[:10])
    assert torch.allclose(scaled[-10:], plain[-10:] / 8.0)


def test_both_forms_give_one_spec_and_the_old_type_key_is_read():
    for name, (theta, scaling) in CASES.items():
        assert RopeSpec.from_config(legacy(theta, scaling)) == RopeSpec.from_config(modern(theta, scaling)), name
    old = RopeSpec.from_config({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (old.kind, old.factor) == ("linear", 2.0)
    assert RopeSpec.from_config({}) == RopeSpec(theta=10000.0, kind="default")


@pytest.mark.parametrize("keys,needle", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type 'dynamic'"),
    ({"rope_scaling": {"type": "su", "factor": 2.0}}, "rope_scaling.type 'su'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor is missing"),
    ({"rope_scaling": {**LLAMA31, "low_freq_factor": None}}, "rope_scaling.low_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor is missing"),
    ({"rope_theta": -1.0}, "rope_theta must be a positive number"),
    ({"rope_theta": "big"}, "rope_theta must be a positive number"),
    ({"rope_scaling": [8.0]}, "rope_scaling must be an object"),
    ({"rope_scaling": {**LLAMA31, "high_freq_factor": 1.0}}, "high_freq_factor must exceed"),
])
def test_bad_rope_settings_name_the_key(keys, needle):
    with pytest.raises(RopeConfigError) as err:
        RopeSpec.from_config(keys)
    assert needle in str(err.value)


def test_the_config_passes_its_rope_to_transformers_modules_too():
    """The LlamaConfig that builds the layers carries the same rope (so transformers' own modules, used as
    references in the equivalence tests, agree with ours)."""
    raw = {"model_type": "llava_mini_llama", "vocab_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
           **legacy(500000.0, LLAMA31)}
    config = LlavaMiniConfig.from_dict(raw)
    reference = LlamaRotaryEmbedding(config.llama)
    ours = RotaryEmbedding(config.rope, config.head_dim)
    x = torch.zeros(1)
    assert all(torch.equal(a, b) for a, b in zip(ours(x, POSITIONS), reference(x, POSITIONS), strict=True))


def test_half_precision_models_keep_float32_frequencies():
    rotary = RotaryEmbedding(RopeSpec.from_config(legacy(500000.0, LLAMA31)), 64)
    before = rotary.inv_freq.clone()
    rotary.to(torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, before)
    cos, _ = rotary(torch.zeros(1, dtype=torch.bfloat16), POSITIONS)
    assert cos.dtype == torch.bfloat16
