"""vidmini.engine.checkpoint: exact round trips, the reference key layout, clear failures, safe `.bin`, the HF cache.

Expected values come from the files on disk (read with safetensors / json directly) or are literals written
by the test; the session fixture `tiny_ckpt` (conftest.py) is never modified — tests that change files work
on a copy (`ckpt`).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.hf_cache import fake_hf_cache
from safetensors.torch import load_file, save_file

from vidmini.engine.checkpoint import CheckpointError, eos_ids_of, load_checkpoint, save_checkpoint
from vidmini.engine.config import LlavaMiniConfig

VISION = "model.vision_tower."
REFERENCE_KEYS = [
    "model.compressor.pos_embed",
    "model.compressor.query",
    "model.compressor.attn.in_proj_weight",
    "model.compressor.ln_q.weight",
    "model.compressor.ln_kv.weight",
    "model.prefusion_layers.0.self_attn.q_proj.weight",
    "model.mm_projector.0.weight",
    "model.mm_projector.2.weight",
    "model.embed_tokens.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the session's tiny checkpoint."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def edit_weights(directory: Path, fn) -> dict[str, torch.Tensor]:
    state = weights(directory)
    fn(state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return state


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def llm_state(loaded) -> dict[str, torch.Tensor]:
    return {k: v for k, v in loaded.model.state_dict().items() if not k.startswith(VISION)}


def assert_same_tensors(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(reference)
    for k, v in reference.items():
        assert state[k].dtype == v.dtype, k
        assert torch.equal(state[k], v), k


# ------------------------------------------------------------------------------------- round trips


def test_load_gives_exactly_the_stored_tensors(tiny_ckpt):
    loaded = load_checkpoint(tiny_ckpt)
    on_disk = weights(tiny_ckpt)
    assert_same_tensors(llm_state(loaded), on_disk)
    # the CLIP tower comes from vision_tower/ (mm_vision_tower is relative to the checkpoint)
    tower = loaded.model.model.vision_tower.vision_tower.state_dict()
    assert_same_tensors(tower, load_file(tiny_ckpt / "vision_tower" / "model.safetensors"))
    # built on the meta device: nothing may be left there (an unassigned parameter or buffer would be)
    assert all(t.device.type == "cpu" for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    assert not loaded.model.training
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert len(loaded.tokenizer) == cfg["vocab_size"]
    assert Path(loaded.directory) == tiny_ckpt


def test_sharded_save_round_trip(tiny_ckpt, tmp_path):
    on_disk = weights(tiny_ckpt)
    loaded = load_checkpoint(tiny_ckpt)
    out = save_checkpoint(
        loaded.model, loaded.tokenizer, tmp_path / "sharded", max_shard_bytes=20_000, eos_ids=loaded.eos_ids
    )
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(on_disk)  # every LLM key, and no vision key
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2
    for shard in shards:
        assert (out / shard).is_file()
        content = load_file(out / shard)
        assert set(content) == {k for k, s in weight_map.items() if s == shard}
        nbytes = sum(v.numel() * v.element_size() for v in content.values())
        assert len(content) == 1 or nbytes <= 20_000, shard
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in on_disk.values())
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config == json.loads((tiny_ckpt / "config.json").read_text())

    shutil.copytree(tiny_ckpt / "vision_tower", out / "vision_tower")
    again = load_checkpoint(out)
    assert_same_tensors(llm_state(again), on_disk)
    expected_eos = tuple(json.loads((tiny_ckpt / "generation_config.json").read_text())["eos_token_id"])
    assert again.eos_ids == expected_eos
    text = "a video of a cat, then a dog"
    assert again.tokenizer(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]


def test_reference_key_layout(tiny_ckpt):
    keys = set(weights(tiny_ckpt))
    missing = [k for k in REFERENCE_KEYS if k not in keys]
    assert not missing
    assert not [k for k in keys if k.startswith("model.vision_tower")]
    assert json.loads((tiny_ckpt / "config.json").read_text())["model_type"] == "llava_mini_llama"


def test_stored_compressor_table_is_used(tiny_ckpt, ckpt):
    table = edit_weights(
        ckpt,
        lambda s: s.__setitem__(
            "model.compressor.pos_embed", torch.full_like(s["model.compressor.pos_embed"], 0.5)
        ),
    )["model.compressor.pos_embed"]
    assert not torch.equal(table, weights(tiny_ckpt)["model.compressor.pos_embed"])  # really a change
    changed = load_checkpoint(ckpt).model.model.compressor
    assert torch.equal(changed.pos_embed, torch.full(table.shape, 0.5))
    # and the forward pass sees it: same features, different table, different compressed token
    original = load_checkpoint(tiny_ckpt).model.model.compressor
    feats = torch.randn(2, 16, table.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(changed(feats), original(feats))


# -------------------------------------------------------------------------------------- mismatches


def test_missing_key_is_named(ckpt):
    key = "model.prefusion_layers.1.mlp.up_proj.weight"
    edit_weights(ckpt, lambda s: s.pop(key))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    message = str(err.value)
    assert key in message and "missing" in message
    assert "unexpected" not in message and "shape" not in message


def test_unexpected_key_is_named(ckpt):
    edit_weights(ckpt, lambda s: s.__setitem__("model.bogus.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    message = str(err.value)
    assert "model.bogus.weight" in message and "unexpected" in message
    assert "missing" not in message


def test_wrong_shape_names_key_and_both_shapes(ckpt):
    key = "model.mm_projector.0.weight"
    good = tuple(weights(ckpt)[key].shape)
    bad = (good[0], good[1] + 1)
    edit_weights(ckpt, lambda s: s.__setitem__(key, torch.zeros(bad)))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    message = str(err.value)
    assert key in message and str(bad) in message and str(good) in message


def test_all_problems_reported_at_once(ckpt):
    def damage(state):
        del state["model.norm.weight"]
        state["model.extra.bias"] = torch.zeros(2)
        state["lm_head.weight"] = torch.zeros(3, 3)

    edit_weights(ckpt, damage)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    message = str(err.value)
    needles = ("missing", "model.norm.weight", "unexpected", "model.extra.bias", "lm_head.weight", "(3, 3)")
    for needle in needles:
        assert needle in message


# ------------------------------------------------------------------------------ embedded vision weights


@pytest.fixture(scope="module")
def clip_state(tiny_ckpt) -> dict[str, torch.Tensor]:
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(str(tiny_ckpt / "vision_tower")).state_dict()


@pytest.mark.parametrize("naming", ["vision_model.", ""], ids=["transformers4", "transformers5"])
def test_embedded_vision_weights_override_the_tower(ckpt, clip_state, naming):
    assert not any(k.startswith("vision_model.") for k in clip_state)  # transformers 5 drops the prefix
    changed = {"embeddings.patch_embedding.weight": 1.0, "post_layernorm.weight": -2.0}

    def embed(state):
        for k, v in clip_state.items():
            state["model.vision_tower.vision_tower." + naming + k] = (v + changed.get(k, 0.0)).contiguous()

    edit_weights(ckpt, embed)
    assert "model.vision_tower.vision_tower.vision_model.post_layernorm.weight" in weights(ckpt) or not naming
    tower = load_checkpoint(ckpt).model.model.vision_tower.vision_tower.state_dict()
    assert set(tower) == set(clip_state)
    for k, v in clip_state.items():
        assert torch.equal(tower[k], v + changed.get(k, 0.0)), k


def test_incomplete_embedded_vision_weights_are_named(ckpt, clip_state):
    def embed(state):
        for k, v in clip_state.items():
            if k != "post_layernorm.bias":
                state["model.vision_tower.vision_tower.vision_model." + k] = v.contiguous()

    edit_weights(ckpt, embed)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert "post_layernorm.bias" in str(err.value) and "missing" in str(err.value)


# ------------------------------------------------------------------------------------------ .bin files


def test_bin_checkpoint_loads(ckpt):
    state = weights(ckpt)
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    assert_same_tensors(llm_state(load_checkpoint(ckpt)), state)


def test_sharded_bin_checkpoint_loads(ckpt):
    state = weights(ckpt)
    (ckpt / "model.safetensors").unlink()
    keys = sorted(state)
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    for name, part in zip(names, parts, strict=True):
        torch.save({k: state[k] for k in part}, ckpt / name)
    weight_map = {k: name for name, part in zip(names, parts, strict=True) for k in part}
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_tensors(llm_state(load_checkpoint(ckpt)), state)


def test_safetensors_preferred_over_bin(ckpt):
    state = weights(ckpt)
    torch.save({k: v + 1.0 for k, v in state.items()}, ckpt / "pytorch_model.bin")
    assert_same_tensors(llm_state(load_checkpoint(ckpt)), state)


def _leave_marker(path: str) -> str:
    Path(path).write_text("arbitrary code ran")
    return path


class _Booby:
    """Unpickling this calls `_leave_marker`: the marker file is proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


def test_bin_needing_full_unpickling_is_refused_without_running_code(ckpt, tmp_path):
    marker = tmp_path / "code-ran"
    state = weights(ckpt)
    state["model.norm.weight"] = _Booby(marker)
    (ckpt / "model.safetensors").unlink()
    path = ckpt / "pytorch_model.bin"
    torch.save(state, path)
    with pytest.raises(pickle.UnpicklingError):  # torch itself refuses it under weights_only=True
        torch.load(path, weights_only=True)
    assert not marker.exists()

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert "refused" in str(err.value) and "pytorch_model.bin" in str(err.value)
    assert not marker.exists()

    torch.load(path, weights_only=False)  # control: a full unpickle does run the payload
    assert marker.read_text() == "arbitrary code ran"


# ------------------------------------------------------------------------------------------ bad inputs


def _damage(directory: Path, case: str) -> Path:
    """Break a checkpoint copy in one way; return what to pass to load_checkpoint."""
    st = directory / "model.safetensors"
    if case == "absent":
        return directory / "absent"
    if case == "a_file":
        return directory / "config.json"
    if case == "config_not_json":
        (directory / "config.json").write_text("{not json")
    elif case == "config_missing":
        (directory / "config.json").unlink()
    elif case == "no_weights":
        st.unlink()
    elif case == "safetensors_garbage":
        st.write_bytes(b"\x00garbage" * 100)
    elif case == "safetensors_empty":
        st.write_bytes(b"")
    elif case == "safetensors_truncated":
        st.write_bytes(st.read_bytes()[:-1000])
    elif case == "shard_missing":
        state = weights(directory)
        st.unlink()
        save_file(state, directory / "model-00001-of-00002.safetensors")
        weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(sorted(state))}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif case == "no_vision_tower":
        shutil.rmtree(directory / "vision_tower")
    elif case == "no_tokenizer":
        (directory / "tokenizer.json").unlink()
    elif case == "bin_garbage":
        st.unlink()
        (directory / "pytorch_model.bin").write_bytes(b"\x00garbage" * 100)
    elif case == "bin_truncated":
        state = weights(directory)
        st.unlink()
        torch.save(state, directory / "pytorch_model.bin")
        data = (directory / "pytorch_model.bin").read_bytes()
        (directory / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    elif case == "bin_empty":
        st.unlink()
        (directory / "pytorch_model.bin").write_bytes(b"")
    elif case == "bin_non_tensor_value":
        state: dict = weights(directory)
        state["model.norm.weight"] = 3  # an int: weights_only=True accepts it
        st.unlink()
        torch.save(state, directory / "pytorch_model.bin")
    elif case == "index_not_json":
        (directory / "model.safetensors.index.json").write_text("{not json")
    elif case == "index_without_weight_map":
        (directory / "model.safetensors.index.json").write_text("{}")
    elif case == "generation_config_not_json":
        (directory / "generation_config.json").write_text("{not json")
    elif case == "vision_weights_corrupt":
        (directory / "vision_tower" / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    else:
        raise AssertionError(case)
    return directory


def bad(case: str, needle: str):
    return pytest.param(case, needle, id=case)


BAD = [
    bad("absent", "does not exist"),
    bad("a_file", "is a file"),
    bad("config_not_json", "config.json"),
    bad("config_missing", "config.json"),
    bad("no_weights", "no model weights"),
    bad("safetensors_garbage", "model.safetensors"),
    bad("safetensors_empty", "model.safetensors"),
    bad("safetensors_truncated", "model.safetensors"),
    bad("shard_missing", "model-00002-of-00002.safetensors"),
    bad("no_vision_tower", "vision tower"),
    bad("no_tokenizer", "tokenizer"),
    bad("bin_garbage", "pytorch_model.bin"),
    # Cases that once escaped as raw exceptions (found by this file; fixed in vidmini/engine/checkpoint.py).
    bad("bin_truncated", "pytorch_model.bin"),
    bad("bin_empty", "pytorch_model.bin"),
    bad("bin_non_tensor_value", "model.norm.weight"),
    bad("index_not_json", "model.safetensors.index.json"),
    bad("index_without_weight_map", "model.safetensors.index.json"),
    bad("generation_config_not_json", "generation_config.json"),
    bad("vision_weights_corrupt", "vision tower"),
]


@pytest.mark.parametrize("case,needle", BAD)
def test_bad_checkpoint_raises_checkpoint_error(ckpt, case, needle):
    target = _damage(ckpt, case)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target)
    assert needle in str(err.value)


def test_unknown_hub_id_offline_says_how_to_download(offline_hub):
    assert not Path("nobody/nothing-here").exists()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint("nobody/nothing-here")
    assert "vidmini download" in str(err.value) and "nobody/nothing-here" in str(err.value)


# ------------------------------------------------------------------------------------------- HF cache


def test_hub_id_resolves_from_the_local_cache(tiny_ckpt, offline_hub):
    snapshot = fake_hf_cache(offline_hub, "acme/tiny-llava-mini", tiny_ckpt)
    assert (snapshot / "model.safetensors").is_symlink()
    assert not Path("acme/tiny-llava-mini").exists()  # not found relative to the working directory
    loaded = load_checkpoint("acme/tiny-llava-mini")
    assert Path(loaded.directory).resolve() == snapshot.resolve()
    assert_same_tensors(llm_state(loaded), weights(tiny_ckpt))


def test_vision_tower_given_as_hub_id_resolves_from_the_cache(ckpt, offline_hub):
    tower_files = load_file(ckpt / "vision_tower" / "model.safetensors")
    fake_hf_cache(offline_hub, "acme/tiny-clip", ckpt / "vision_tower")
    shutil.rmtree(ckpt / "vision_tower")
    edit_config(ckpt, mm_vision_tower="acme/tiny-clip")
    loaded = load_checkpoint(ckpt)
    assert_same_tensors(loaded.model.model.vision_tower.vision_tower.state_dict(), tower_files)


# ---------------------------------------------------------------------------------------------- eos ids


def test_eos_ids_from_generation_config_then_config(ckpt):
    (ckpt / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [7, 8, 9]}))
    edit_config(ckpt, eos_token_id=[3, 4])
    assert load_checkpoint(ckpt).eos_ids == (7, 8, 9)
    (ckpt / "generation_config.json").unlink()
    assert load_checkpoint(ckpt).eos_ids == (3, 4)


@pytest.mark.parametrize(
    "generation,config_eos,expected",
    [
        ({"eos_token_id": 5}, 42, (5,)),
        ({"bos_token_id": 1}, 42, (42,)),
        ({"eos_token_id": None}, [11, 12], (11, 12)),
        (None, 42, (42,)),
        (None, None, ()),
    ],
)
def test_eos_id_forms(ckpt, generation, config_eos, expected):
    if generation is None:
        (ckpt / "generation_config.json").unlink()
    else:
        (ckpt / "generation_config.json").write_text(json.dumps(generation))
    edit_config(ckpt, eos_token_id=config_eos)
    assert eos_ids_of(ckpt, LlavaMiniConfig.from_file(ckpt)) == expected


# ------------------------------------------------------------------------------------------------ dtype


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_load(tiny_ckpt, name, dtype):
    loaded = load_checkpoint(tiny_ckpt, dtype=name)
    on_disk = weights(tiny_ckpt)
    params = {k: p for k, p in loaded.model.named_parameters() if not k.startswith(VISION)}
    assert set(params) == set(on_disk)
    for k, p in params.items():
        assert p.dtype == dtype, k
        assert torch.equal(p, on_disk[k].to(dtype)), k
    assert loaded.model.dtype == dtype


def test_default_dtype_is_fp32(tiny_ckpt):
    loaded = load_checkpoint(tiny_ckpt)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_invalid_dtype_is_refused(tiny_ckpt):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_ckpt, dtype="fp8")
    assert "dtype" in str(err.value) and "bf16" in str(err.value)


# ------------------------------------------------------------------------------------- tied embeddings


@pytest.fixture
def tied(ckpt) -> Path:
    """A checkpoint with tie_word_embeddings and no lm_head.weight (as tied Llama checkpoints are stored)."""
    edit_config(ckpt, tie_word_embeddings=True)
    edit_weights(ckpt, lambda s: s.pop("lm_head.weight"))
    return ckpt


def test_tied_embeddings_load(tied):
    embed = weights(tied)["model.embed_tokens.weight"]
    loaded = load_checkpoint(tied)
    assert torch.equal(loaded.model.lm_head.weight, embed)
    assert torch.equal(loaded.model.model.embed_tokens.weight, embed)


def test_tied_embeddings_save_round_trip(tied, tmp_path):
    embed = weights(tied)["model.embed_tokens.weight"]
    loaded = load_checkpoint(tied)
    out = save_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "saved")
    shutil.copytree(tied / "vision_tower", out / "vision_tower")
    again = load_checkpoint(out)
    assert torch.equal(again.model.lm_head.weight, embed)


def test_save_in_half_precision_stores_rounded_weights_and_keeps_ties(tied, tmp_path):
    """`save_checkpoint(dtype=...)` (the demo model's 30 MB budget): every floating tensor on disk in that dtype, the
    fp32 load gives exactly the rounded weights, and a tied embedding is still stored once."""
    loaded = load_checkpoint(tied)
    out = save_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "half", dtype=torch.float16)
    shutil.copytree(tied / "vision_tower", out / "vision_tower")
    on_disk = weights(out)
    assert on_disk and all(v.dtype == torch.float16 for v in on_disk.values())
    assert "lm_head.weight" not in on_disk
    again = load_checkpoint(out)
    originals, reloaded = dict(loaded.model.named_parameters()), dict(again.model.named_parameters())
    for k, v in on_disk.items():
        assert torch.equal(reloaded[k], originals[k].half().float()) and torch.equal(reloaded[k], v.float()), k
    assert torch.equal(again.model.lm_head.weight, again.model.model.embed_tokens.weight)
    assert not torch.equal(again.model.model.embed_tokens.weight, loaded.model.model.embed_tokens.weight)
