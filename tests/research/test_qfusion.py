"""Question fusion (research.training.qfusion): the cached training path gives the engine's numbers, an added layer starts as
the identity, and the per-frame / bag targets agree with the question generator's own answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from research.training.qfusion import (
    COLOURS,
    Ask,
    FrameFacts,
    add_prefusion_layer,
    bag_target,
    bag_weights,
    build_prefix_cache,
    frame_target,
    fuse_questions,
    kind_positions,
    question_ids,
    tower_features,
    trainable_rows,
)
from research.training.train import load_video, normalize, seen_targets
from vidmini.demo.questions import make_questions
from vidmini.demo.world import BACKGROUNDS, KINDS, WORDS
from vidmini.engine.fusion import prefuse_prefix, prefuse_question
from vidmini.engine.load import SHIPPED_MODEL_DIR, choose_model, open_engine
from vidmini.engine.prompt import build_prompt

shipped = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")


@pytest.fixture(scope="module")
def demo():
    engine = open_engine(choose_model(str(SHIPPED_MODEL_DIR)))
    return engine.model, engine.tokenizer


@shipped
def test_added_layer_starts_as_the_identity(demo):
    model, tok = demo
    video = load_video(12345, 4, model.vision.vision_tower.config.image_size)
    prefix = build_prompt(tok, "").prefix
    q = build_prompt(tok, "Is there a red star?").question
    patches, compressed = model.encode_visual(normalize(video.pixels)[:, None])
    before = prefuse_prefix(model, patches, compressed, prefix)
    q_before = prefuse_question(model, before, q)
    try:
        add_prefusion_layer(model)
        after = prefuse_prefix(model, patches, compressed, prefix)
        assert model.config.prefusion_layer_num == len(model.model.prefusion_layers) == len(after.keys)
        torch.testing.assert_close(after.compressed, before.compressed, rtol=0, atol=0)
        torch.testing.assert_close(after.prefix_text, before.prefix_text, rtol=0, atol=0)
        torch.testing.assert_close(prefuse_question(model, after, q), q_before, rtol=0, atol=0)
    finally:
        del model.model.prefusion_layers[-1]
        model.config.prefusion_layer_num = len(model.model.prefusion_layers)


def add_layer_off_identity(model, seed: int) -> None:
    """An added pre-fusion layer moved off the identity (random small offsets), so it changes the numbers."""
    layer = add_prefusion_layer(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@shipped
def test_cached_training_path_equals_the_engines_prefusion(demo):
    """With the new layer moved off the identity, the stage's cached computation gives each frame's fused question
    and c' as the engine's prefuse_prefix + prefuse_question do (up to the fp16 cache)."""
    model, tok = demo
    size = model.vision.vision_tower.config.image_size
    video = load_video(777, 6, size)
    try:
        add_layer_off_identity(model, seed=0)
        prefix = build_prompt(tok, "").prefix
        feats = tower_features(model, [video.pixels], normalize)
        cache = build_prefix_cache(model, feats, prefix, frozen=len(model.model.prefusion_layers) - 1)
        patches, compressed = model.encode_visual(normalize(video.pixels)[:, None])
        states = prefuse_prefix(model, patches, compressed, prefix)
        for ask in (Ask("presence", 1, 2), Ask("order", 0, 3), Ask("text")):
            ids = question_ids(tok, ask)
            rows = torch.arange(len(video.pixels))
            with torch.no_grad():
                fused, c_new, _ = fuse_questions(model, cache, rows, ids[None].expand(len(rows), -1))
            for f in range(len(rows)):
                want = prefuse_question(model, states.select([f]), ids)
                scale = want.abs().max().item()
                err = (fused[f] - want).abs()
                # fp16 keeps ~5e-4 relative; a layer on top of the cached ones can double it at the largest
                # values. A wrong mask or position would be off by O(scale), not by 1e-3 of it.
                assert err.max().item() < 3e-3 * scale and err.mean().item() < 3e-4 * scale
            scale = states.compressed.abs().max().item()
            assert (c_new - states.compressed[:, 0]).abs().max().item() < 1e-3 * scale
    finally:
        del model.model.prefusion_layers[-1]
        model.config.prefusion_layer_num = len(model.model.prefusion_layers)


@shipped
def test_route_head_attention_is_the_new_layers_own_and_the_colour_word_precedes_the_kind(demo, monkeypatch):
    """The binding stage trains one head of the new layer to look from a presence question's kind word at the word
    before it: the probabilities it trains are the ones the layer's attention uses (checked through the attention
    function itself, with one-hot values), and the word before the kind word is the asked colour in every
    presence question."""
    import research.training.qfusion as qf

    model, tok = demo
    for c in range(len(COLOURS)):
        for k in range(len(KINDS)):
            ids = question_ids(tok, Ask("presence", c, k))
            [(pos, kind)] = kind_positions(tok, ids)
            assert kind == k and tok.decode([int(ids[pos - 1])]).strip() == COLOURS[c]
    video = load_video(778, 3, model.vision.vision_tower.config.image_size)
    try:
        add_layer_off_identity(model, seed=1)
        feats = tower_features(model, [video.pixels], normalize)
        cache = build_prefix_cache(model, feats, build_prompt(tok, "").prefix,
                                   frozen=len(model.model.prefusion_layers) - 1)
        calls = []
        real = qf.attention

        def spy(q, k, v, mask, causal):
            calls.append((q, k, mask))
            return real(q, k, v, mask, causal=causal)

        monkeypatch.setattr(qf, "attention", spy)
        ids = question_ids(tok, Ask("presence", 2, 1))
        rows = torch.arange(len(video.pixels))
        heads, kv_heads = model.config.llama.num_attention_heads, model.config.llama.num_key_value_heads
        for head in (0, heads - 1):
            calls.clear()
            with torch.no_grad():
                _, _, probs = fuse_questions(model, cache, rows, ids[None].expand(len(rows), -1), tap=head)
            q, k, mask = calls[-2]  # the new layer over the question (the last call is c's own query)
            n = k.shape[2]
            kv = head // (heads // kv_heads)
            onehot = torch.eye(n).expand(len(rows), 1, n, n)
            want = real(q[:, head : head + 1], k[:, kv : kv + 1], onehot, mask, causal=False)[:, 0]
            assert probs.shape == want.shape == (len(rows), len(ids), n)
            torch.testing.assert_close(probs, want, rtol=0, atol=1e-5)
            assert torch.allclose(probs.sum(-1), torch.ones(len(rows), len(ids)))
            assert probs[:, 0, cache.next_position + 1 :].abs().max() == 0  # causal within the question
    finally:
        del model.model.prefusion_layers[-1]
        model.config.prefusion_layer_num = len(model.model.prefusion_layers)


@shipped
def test_question_words_located_and_only_their_rows_trainable(demo):
    _, tok = demo
    ids = question_ids(tok, Ask("order", KINDS.index("star"), KINDS.index("circle")))
    assert [k for _, k in kind_positions(tok, ids)] == [KINDS.index("star"), KINDS.index("circle")]
    ids = question_ids(tok, Ask("count", KINDS.index("triangle")))
    assert [k for _, k in kind_positions(tok, ids)] == [KINDS.index("triangle")]  # the plural
    assert kind_positions(tok, question_ids(tok, Ask("text"))) == []
    rows = set(trainable_rows(tok).tolist())
    prefix = set(build_prompt(tok, "").prefix.tolist())
    assert rows and not rows & prefix
    answers = {i for a in ("yes", "no", "red", "circle", "3", "CAT") for i in tok(a, add_special_tokens=False).input_ids}
    assert not rows & answers  # tokens the LLM writes (and reads back) keep their embeddings
    assert set(question_ids(tok, Ask("presence", 0, 0)).tolist()) - prefix - answers <= rows


def _ask_from(question: str) -> Ask:
    words = question.rstrip("?").replace(",", "").split()
    kinds = [KINDS.index(w.rstrip("s")) for w in words if w.rstrip("s") in KINDS]
    if question.startswith("Is there"):
        return Ask("presence", COLOURS.index(words[3]), kinds[0])
    if question.startswith("What colour is the background"):
        return Ask("scene")
    if question.startswith("What colour"):
        return Ask("attribute", kinds[0])
    if question.startswith("How many"):
        return Ask("count", kinds[0])
    if question.startswith("Which appears first"):
        return Ask("order", kinds[0], kinds[1])
    return Ask("text")


def test_targets_agree_with_the_question_generators_answers():
    """For the generator's own questions over real timelines, a bag of the question's frames has the generator's
    exact answer, in every family (the generator checks its answers against `answer_for`)."""
    rng = np.random.default_rng(0)
    checked = dict.fromkeys(("presence", "attribute", "count", "order", "text", "scene"), 0)
    for seed in range(8):
        video = load_video(1000 + seed, 60, 80)
        facts = FrameFacts.from_probes(video.probes)
        for q in make_questions(video.timeline, rng, per_family=8):
            ask = _ask_from(q.question)
            assert ask.family == q.family and ask.text() == q.question
            got = bag_target(ask, facts, list(range(q.start_s, q.end_s + 1)))
            if q.family == "presence":
                assert got == (q.answer == "yes")
            elif q.family == "attribute":
                assert COLOURS[got - 1] == q.answer
            elif q.family == "count":
                assert str(got) == q.answer
            elif q.family == "order":
                assert got == (q.answer == KINDS[ask.a])
            elif q.family == "text":
                assert WORDS[got - 1] == q.answer
            else:
                assert list(BACKGROUNDS)[got] == q.answer
            checked[q.family] += 1
    assert all(n >= 20 for n in checked.values()), checked
    # a frame's own target is the answer of the bag holding that frame alone
    for f in range(0, 60, 7):
        for c, k in np.argwhere(facts.pairs[f]):
            assert frame_target(Ask("presence", int(c), int(k)), facts, f) == (1,)
            assert bag_target(Ask("presence", int(c), int(k)), facts, [f]) == 1
            assert frame_target(Ask("count", int(k)), facts, f)[0] == bag_target(Ask("count", int(k)), facts, [f]) >= 1


def test_bag_weights_make_a_needle_and_sum_to_one():
    rng = np.random.default_rng(1)
    shares = []
    for _ in range(300):
        yes = np.array([True, False, False, False, False])
        w = bag_weights(rng, yes)
        assert w.sum() == pytest.approx(1.0) and (w > 0).all()
        shares.append(w[0])
    assert min(shares) < 0.01 and max(shares) > 0.5  # from a needle to most of the range
    w = bag_weights(rng, np.zeros(3, bool))
    assert w.sum() == pytest.approx(1.0)


def test_seen_targets_mark_kinds_seen_in_earlier_frames():
    counts = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]])
    t = seen_targets(counts).numpy()
    assert t[:, :4].tolist() == (counts > 0).astype(float).tolist()
    assert t[:, 4:].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
