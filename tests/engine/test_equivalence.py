"""The cache split (encode_frames + answer) computes what the paper's one pass (forward_full) computes,
and the one pass computes what transformers' own Llama layers compute with the reference's masks."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from vidmini.demo.tiny import build_tiny_checkpoint
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.fusion import prefuse_full
from vidmini.engine.generate import SamplingConfig
from vidmini.engine.inference import Engine

QUESTION = "What colour is the square?"
OTHER = "How many circles are there?"


def make_engine(directory) -> Engine:
    loaded = load_checkpoint(directory)
    return Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids, encode_batch=5)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return make_engine(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1))


@pytest.fixture(scope="module")
def hd_engine(tmp_path_factory) -> Engine:
    return make_engine(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_hd"), seed=2, resolution_ratio=2))


def random_image(seed: int, size=(45, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def random_frames(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 36, 64, 3), dtype=np.uint8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def greedy(n: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, stop_ids=())


def tokens(events) -> list[int]:
    return [e.token_id for e in events]


@pytest.mark.parametrize("kind", ["image", "hd_image", "video16", "hd_video4"])
def test_split_equals_full(kind, engine, hd_engine):
    eng = hd_engine if kind.startswith("hd") else engine
    if kind == "video16":
        pixels = eng.frame_pixels(random_frames(3, 16))
        assert pixels.shape[:2] == (16, 1)
    elif kind == "hd_video4":
        pixels = eng.frame_pixels(random_frames(3, 4))
        assert pixels.shape[:2] == (4, 5)  # 2×2 crops + the whole frame
    else:
        pixels = eng.image_pixels(random_image(4))
        assert pixels.shape[1] == (5 if kind == "hd_image" else 1)
    states = eng.encode_frames(pixels)
    assert states.num_frames == pixels.shape[0]

    cached = eng.first_logits(QUESTION, states)
    full = eng.first_logits_full(pixels, QUESTION)
    assert rel_err(cached, full) < 1e-4
    # the logits must depend on the pixels at all, or the comparison above proves little
    other_pixels = (eng.frame_pixels(random_frames(9, pixels.shape[0])) if "video" in kind
                    else eng.image_pixels(random_image(99)))
    assert rel_err(eng.first_logits_full(other_pixels, QUESTION), full) > 1e-3

    assert tokens(eng.answer(QUESTION, states, greedy(16))) == tokens(eng.forward_full(pixels, QUESTION, greedy(16)))


def test_two_questions_on_one_cache_equal_fresh_computations(engine):
    pixels = engine.frame_pixels(random_frames(5, 16))
    states = engine.encode_frames(pixels)
    prefix = engine.build_prefix_cache(states)
    for question in (QUESTION, OTHER, QUESTION):
        fresh = engine.first_logits_full(pixels, question)
        assert rel_err(engine.first_logits(question, states, prefix), fresh) < 1e-4
        assert rel_err(engine.first_logits(question, states), fresh) < 1e-4
        got = tokens(engine.answer(question, states, greedy(16), prefix_cache=prefix))
        assert got == tokens(engine.forward_full(pixels, question, greedy(16)))
    assert rel_err(engine.first_logits_full(pixels, QUESTION), engine.first_logits_full(pixels, OTHER)) > 1e-3


def test_token_id_zero_is_masked_like_the_reference(engine):
    """The reference masks every id <= 0 in pre-fusion, a real token (id 0) included."""
    zero_text = engine.tokenizer.decode([0])
    question = f"Is there a {zero_text} here{zero_text}"
    assert 0 in engine.prompt(question).question.tolist()
    pixels = engine.frame_pixels(random_frames(6, 4))
    states = engine.encode_frames(pixels)
    assert rel_err(engine.first_logits(question, states), engine.first_logits_full(pixels, question)) < 1e-4


def test_frame_subsets_and_batches_do_not_change_states(engine):
    pixels = engine.frame_pixels(random_frames(7, 12))
    whole = engine.encode_frames(pixels, batch_size=12)
    batched = engine.encode_frames(pixels, batch_size=5)
    assert rel_err(batched.compressed, whole.compressed) < 1e-5
    sub = whole.select(slice(3, 9))
    assert rel_err(engine.first_logits(QUESTION, sub), engine.first_logits_full(pixels[3:9], QUESTION)) < 1e-4


def test_truncation_to_tokenizer_model_max_length(tmp_path):
    """The reference cuts the LLM input at tokenizer_model_max_length; both paths must cut identically."""
    eng = make_engine(build_tiny_checkpoint(tmp_path, seed=3, tokenizer_model_max_length=140))
    pixels = eng.frame_pixels(random_frames(8, 16))
    states = eng.encode_frames(pixels)
    assert eng.full_inputs(pixels, QUESTION).shape[1] == 140
    full = eng.first_logits_full(pixels, QUESTION)
    assert rel_err(eng.first_logits(QUESTION, states), full) < 1e-4
    assert rel_err(eng.first_logits(QUESTION, states, eng.build_prefix_cache(states)), full) < 1e-4


def reference_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers 4.43's _prepare_4d_causal_attention_mask: causal, padded keys at the dtype's minimum."""
    n = valid.shape[0]
    minimum = torch.finfo(dtype).min
    mask = torch.full((n, n), minimum, dtype=dtype).triu(1)
    mask = mask.masked_fill(~valid[None, :], minimum)
    return mask[None, None]


def test_prefusion_matches_transformers_layers(engine):
    """Our explicit pre-fusion forward against transformers' LlamaDecoderLayer with the reference's mask."""
    model = engine.model
    pixels = engine.image_pixels(random_image(11))
    patches, compressed = model.encode_visual(pixels)
    ids = engine.prompt(QUESTION).full()
    fused_c, fused_text = prefuse_full(model, patches, compressed, ids)

    text = model.model.embed_tokens(ids.clamp(min=0))[None]
    x = torch.cat([patches, compressed, text], dim=1)
    valid = torch.cat([torch.ones(patches.shape[1] + 1, dtype=torch.bool), ids > 0])
    positions = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)[None]
    rotary = LlamaRotaryEmbedding(model.config.llama)
    pos_emb = rotary(x, positions)
    mask = reference_mask(valid, x.dtype)
    with torch.no_grad():
        for layer in model.model.prefusion_layers:
            x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=pos_emb)
    t = ids.shape[0]
    expected_text = torch.where((ids > 0)[None, :, None], x[:, -t:], text)
    assert rel_err(fused_text, expected_text) < 1e-5
    assert rel_err(fused_c, x[:, -t - 1 : -t]) < 1e-5


def test_llm_matches_transformers_llama(engine):
    """Our LLM prefill (explicit KV cache) against transformers' LlamaForCausalLM on the same embeddings."""
    model = engine.model
    pixels = engine.frame_pixels(random_frames(12, 3))
    embeds = engine.full_inputs(pixels, QUESTION)
    ref = LlamaForCausalLM(model.config.llama).eval()
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("model.embed_tokens", "model.layers",
                                                                            "model.norm", "lm_head"))}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not [m for m in missing if "rotary" not in m] and not unexpected
    with torch.no_grad():
        expected = ref(inputs_embeds=embeds).logits[0, -1].float()
    assert rel_err(engine.first_logits_full(pixels, QUESTION), expected) < 1e-5


def test_compressor_follows_the_reference_formula(hd_engine):
    """Query = LN(q) + pos; keys = LN(x) + pos resized to x's grid; values = LN(x); one MHA."""
    comp = hd_engine.model.model.compressor
    with torch.no_grad():
        comp.pos_embed.copy_(torch.randn_like(comp.pos_embed))  # a table that is not constant
        x = torch.randn(2, 64, comp.query.shape[1])  # an 8×8 grid: the 1×1 table is resized
        kv = comp.ln_kv(x)
        key_pos = comp.pos_embed.expand(64, -1)  # bicubic resize of a 1×1 grid is that one value
        q = (comp.ln_q(comp.query) + comp.pos_embed)[None].expand(2, -1, -1)
        expected, _ = comp.attn(q, kv + key_pos, kv)
        torch.testing.assert_close(comp(x), expected, rtol=1e-5, atol=1e-6)


def test_sampling_cancel_and_stops(engine):
    pixels = engine.frame_pixels(random_frames(13, 2))
    states = engine.encode_frames(pixels)
    greedy_ids = tokens(engine.answer(QUESTION, states, greedy(8)))
    assert len(greedy_ids) == 8
    # top_p tiny keeps only the most likely token: sampling then equals greedy
    narrow = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6, stop_ids=(), seed=0)
    assert tokens(engine.answer(QUESTION, states, narrow)) == greedy_ids
    hot = SamplingConfig(max_new_tokens=8, temperature=5.0, stop_ids=(), seed=123)
    first, second = tokens(engine.answer(QUESTION, states, hot)), tokens(engine.answer(QUESTION, states, hot))
    assert first == second  # seeded
    assert first != greedy_ids
    # a stop id ends the answer before it is emitted
    stop_at = greedy_ids[3]
    stopped = tokens(engine.answer(QUESTION, states, SamplingConfig(max_new_tokens=8, stop_ids=(stop_at,))))
    assert stopped == greedy_ids[: greedy_ids.index(stop_at)]
    # cancellation stops a stream
    cancel = threading.Event()
    got = []
    for ev in engine.answer(QUESTION, states, greedy(8), cancel=cancel):
        got.append(ev.token_id)
        cancel.set()
    assert got == greedy_ids[:1]


def test_logprobs_are_log_softmax_of_logits(engine):
    pixels = engine.frame_pixels(random_frames(14, 2))
    states = engine.encode_frames(pixels)
    logits = engine.first_logits(QUESTION, states)
    ev = next(iter(engine.answer(QUESTION, states, SamplingConfig(max_new_tokens=1, stop_ids=(), logprobs=3))))
    expected = torch.log_softmax(logits.double(), -1)
    top = expected.topk(3)
    assert [i for i, _ in ev.top] == top.indices.tolist()
    np.testing.assert_allclose([lp for _, lp in ev.top], top.values.numpy(), rtol=1e-5)
    assert ev.token_id == top.indices[0].item()


def test_half_precision_split_stays_close_to_full(tmp_path):
    """bf16: the split and the one pass round differently, but must stay close and agree on the top token."""
    directory = build_tiny_checkpoint(tmp_path, seed=6)
    loaded = load_checkpoint(directory, dtype="bf16")
    eng = Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids)
    assert eng.model.lm_head.weight.dtype == torch.bfloat16
    pixels = eng.frame_pixels(random_frames(15, 6))
    states = eng.encode_frames(pixels)
    assert states.keys[0].dtype == torch.bfloat16
    cached, full = eng.first_logits(QUESTION, states), eng.first_logits_full(pixels, QUESTION)
    assert rel_err(cached, full) < 3e-2
    assert cached.argmax() == full.argmax()
