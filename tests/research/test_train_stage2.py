"""Stage 2's shared clip pass: several questions over one LLM pass of a clip give each question exactly the
loss, gradients and frame states of its own full pass, and the extra questions are drawn as promised."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from research.training.train import (
    PAIRS,
    FusedQuestionBank,
    QATokens,
    RetrievalProbe,
    answer_attention,
    clip_questions_forward,
    clips_questions_forward,
    llm_forward,
    load_video,
    more_questions,
    normalize,
    onset_targets,
    retrieval_loss,
    retrieval_target,
    seen_targets,
)
from vidmini.demo.questions import range_questions, timeline_facts
from vidmini.demo.world import KINDS, generate_timeline
from vidmini.engine.fusion import mean_over_frames, prefuse_prefix, prefuse_question
from vidmini.engine.llama import attention
from vidmini.engine.load import SHIPPED_MODEL_DIR, choose_model, open_engine
from vidmini.engine.prompt import build_prompt

shipped = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")


@shipped
def test_shared_clip_pass_equals_one_pass_per_question():
    engine = open_engine(choose_model(str(SHIPPED_MODEL_DIR)))
    model, tok = engine.model, engine.tokenizer
    torch.manual_seed(0)
    for p in model.model.layers.parameters():  # off the trained weights, so no loss is ~0 by luck
        p.data += 0.02 * torch.randn_like(p)
    video = load_video(31337, 12, model.vision.vision_tower.config.image_size)
    with torch.no_grad():
        patches, compressed = model.encode_visual(normalize(video.pixels)[:, None])
        states = prefuse_prefix(model, patches, compressed, build_prompt(tok, "").prefix)
    sel = states.select(slice(2, 11))
    ids = QATokens(tok)
    asked = [("Which appears first, the circle or the square?", "circle"), ("What word is shown?", "CAT"),
             ("Is there a red star?", "no"), ("How many triangles are there?", "2")]
    with torch.no_grad():
        fused = [prefuse_question(model, sel, ids.question(q)) for q, _ in asked]
        prefix = torch.cat([mean_over_frames(sel.prefix_text), sel.compressed.flatten(0, 1)])
    answers = [ids.answer(a) for _, a in asked]
    assert len({len(f) for f in fused}) > 1  # rows of different lengths: the padding is exercised
    params = list(model.model.layers.parameters())

    losses, tapped, _ = clip_questions_forward(model, prefix, fused, answers)
    shared_grads = torch.autograd.grad(losses.sum(), params)
    one_by_one, grads = [], [torch.zeros_like(p) for p in params]
    for f, a in zip(fused, answers, strict=True):
        loss, tap = llm_forward(model, torch.cat([prefix, f])[None], a[None])
        one_by_one.append(loss)
        for g, d in zip(grads, torch.autograd.grad(loss, params), strict=True):
            g += d
        torch.testing.assert_close(tapped, tap[0, : len(prefix)], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses, torch.stack(one_by_one).detach(), rtol=1e-4, atol=1e-5)
    assert losses.min() > 1e-3 and (losses.max() - losses.min()) > 1e-3
    for g, d in zip(grads, shared_grads, strict=True):
        torch.testing.assert_close(d, g, rtol=1e-3, atol=1e-5)


@shipped
def test_one_pass_over_a_steps_clips_equals_one_pass_per_clip():
    """Clips of different lengths, with different numbers of questions of different widths, stacked into one
    pass: each clip's losses, frame states and the summed gradients are what it gives alone."""
    engine = open_engine(choose_model(str(SHIPPED_MODEL_DIR)))
    model, tok = engine.model, engine.tokenizer
    torch.manual_seed(1)
    for p in model.model.layers.parameters():
        p.data += 0.02 * torch.randn_like(p)
    video = load_video(4242, 20, model.vision.vision_tower.config.image_size)
    with torch.no_grad():
        patches, compressed = model.encode_visual(normalize(video.pixels)[:, None])
        states = prefuse_prefix(model, patches, compressed, build_prompt(tok, "").prefix)
    ids = QATokens(tok)
    asked = [[("Is there a red star?", "no"), ("How many triangles are there?", "12")],
             [("What word is shown?", "CAT")],
             [("Which appears first, the circle or the square?", "circle"), ("What colour is the background?",
                                                                              "dark blue"),
              ("Is there a green circle?", "yes")]]
    ranges = [(0, 7), (5, 5), (3, 19)]
    prefixes, fused, answers = [], [], []
    with torch.no_grad():
        for (a, b), qs in zip(ranges, asked, strict=True):
            sel = states.select(slice(a, b + 1))
            prefixes.append(torch.cat([mean_over_frames(sel.prefix_text), sel.compressed.flatten(0, 1)]))
            fused.append([prefuse_question(model, sel, ids.question(q)) for q, _ in qs])
    answers = [[ids.answer(x) for _, x in qs] for qs in asked]
    params = list(model.model.layers.parameters())

    losses, tapped = clips_questions_forward(model, prefixes, fused, answers)
    together = torch.autograd.grad(sum(x.sum() for x in losses) + sum(t.square().mean() for t in tapped), params)
    alone = [torch.zeros_like(p) for p in params]
    for c in range(len(prefixes)):
        loss, tap, _ = clip_questions_forward(model, prefixes[c], fused[c], answers[c])
        torch.testing.assert_close(losses[c], loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tapped[c], tap, rtol=1e-4, atol=1e-5)
        for g, d in zip(alone, torch.autograd.grad(loss.sum() + tap.square().mean(), params), strict=True):
            g += d
    assert [len(x) for x in losses] == [2, 1, 3]
    for g, d in zip(alone, together, strict=True):
        torch.testing.assert_close(d, g, rtol=1e-3, atol=1e-5)


@shipped
def test_question_bank_gives_the_engines_fused_question():
    """The bank's clip mean of per-frame float16 fused questions is the engine's `prefuse_question`."""
    engine = open_engine(choose_model(str(SHIPPED_MODEL_DIR)))
    model, tok = engine.model, engine.tokenizer
    video = load_video(5150, 40, model.vision.vision_tower.config.image_size)
    with torch.no_grad():
        patches, compressed = model.encode_visual(normalize(video.pixels)[:, None])
        states = prefuse_prefix(model, patches, compressed, build_prompt(tok, "").prefix)
    bank = FusedQuestionBank(model, [states], chunk=16)  # several chunks
    ids = QATokens(tok)
    for text, (a, b) in [("Is there a blue circle?", (0, 39)), ("What word is shown?", (3, 3)),
                         ("Is there a blue circle?", (17, 30)), ("How many stars are there?", (20, 35))]:
        want = prefuse_question(model, states.select(slice(a, b + 1)), ids.question(text))
        got = bank.fused(0, text, ids.question(text), a, b)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert len(bank.frames) == 3 and bank.frames[(0, "What word is shown?")].shape[0] == 40
    whole = bank.fused(0, "Is there a blue circle?", ids.question("Is there a blue circle?"), 0, 39)
    part = bank.fused(0, "Is there a blue circle?", ids.question("Is there a blue circle?"), 17, 30)
    assert (whole - part).abs().max() > 1e-3  # the range matters


def test_more_questions_balance_and_never_repeat():
    tl = generate_timeline(8080, 120)
    facts = timeline_facts(tl)
    rng = np.random.default_rng(0)
    drawn: Counter = Counter()
    for _ in range(400):
        a = int(rng.integers(0, 100))
        candidates = range_questions(facts, a, a + int(rng.integers(0, 20)))
        skip = candidates[0].question
        picked = more_questions(candidates, skip, 5, rng)
        texts = [q.question for q in picked]
        assert len(texts) == len(set(texts)) == min(5, len(candidates) - 1)
        assert skip not in texts and all(q in candidates for q in picked)
        there = [q.question.split()[3:5] for q in candidates if q.family == "presence" and q.answer == "yes"]
        for q in picked:
            if q.family == "presence" and q.answer == "no":
                colour, kind = q.question[:-1].split()[3:5]
                hard = any(c == colour or k == kind for c, k in there)
                drawn[("presence", "hard no" if hard else "easy no")] += 1
            elif q.family in ("presence", "count"):
                drawn[(q.family, q.answer)] += 1
    yes, hard, easy = drawn[("presence", "yes")], drawn[("presence", "hard no")], drawn[("presence", "easy no")]
    assert yes > 100 and 0.8 < yes / (hard + easy) < 1.25  # most candidates are "no": balanced anyway
    assert hard > easy  # binding is tested more often than plain absence
    zeros = drawn[("count", "0")] / sum(v for (f, _), v in drawn.items() if f == "count")
    assert zeros < 0.25
    everything = range_questions(facts, 0, 119)
    assert len(more_questions(everything, "", 10_000, rng)) == len(everything)  # drains every group


@pytest.mark.parametrize(("seed", "start", "end"), [(21, 0, 29), (21, 7, 7), (99, 4, 22)])
def test_pair_seen_bits_at_a_clips_last_frame_are_its_presence_answers(seed, start, end):
    video = load_video(seed, 30, 32)
    bits = seen_targets(video.probes["present"][start : end + 1]).numpy()
    last = np.logical_or(bits[-1, : len(PAIRS)], bits[-1, len(PAIRS) :])
    answers = {q.question: q.answer for q in range_questions(timeline_facts(video.timeline), start, end)
               if q.family == "presence"}
    assert len(answers) == len(PAIRS)
    for (colour, kind), seen in zip(PAIRS, last, strict=True):
        assert answers[f"Is there a {colour} {kind}?"] == ("yes" if seen else "no")
    assert 0 < last.sum() < len(PAIRS)


def test_onset_bits_mark_each_kinds_first_frame_in_the_clip():
    counts = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0], [1, 0, 0, 3]])
    assert onset_targets(counts).numpy().tolist() == [
        [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize("seed", [21, 33, 99])
def test_order_answers_follow_from_onset_and_seen_before_bits(seed):
    """At the frame where one named kind first appears, whether the other was seen before is the answer to
    "which appears first": what the frame-position head's targets give the LLM to build on."""
    video = load_video(seed, 120, 32)
    facts = timeline_facts(video.timeline)
    checked = 0
    for start, length in [(s, n) for s in range(0, 110, 2) for n in (8, 30, 90)]:
        end = min(119, start + length - 1)
        counts = video.probes["counts"][start : end + 1]
        onset, seen = onset_targets(counts).numpy(), seen_targets(counts).numpy()
        before = seen[:, len(KINDS) :]
        for q in range_questions(facts, start, end):
            if q.family != "order":
                continue
            kind1, kind2 = q.question.removeprefix("Which appears first, the ").removesuffix("?").split(" or the ")
            a, b = KINDS.index(kind1), KINDS.index(kind2)
            assert onset[:, b].sum() == 1  # each named kind first appears exactly once in the clip
            frame = int(np.flatnonzero(onset[:, b])[0])
            assert q.answer == (kind1 if before[frame, a] else kind2)
            checked += 1
    assert checked >= 5


def test_answer_attention_is_the_engines_attention_at_each_answer_position():
    """With one-hot values (value j = e_j) the engine's attention output is its probability row, so the probe's
    probabilities can be checked against the real `attention` (GQA, causal, the clip shared by every row)."""
    torch.manual_seed(0)
    n, heads, kv_heads, width, length, d = 3, 4, 2, 7, 20, 32
    queries = torch.randn(n, heads, width, d) * 2
    keys = torch.randn(n, kv_heads, length + width, d)
    keys[:, :, :length] = keys[:1, :, :length]  # the clip's keys are the same for every row
    values = torch.eye(length + width, d).expand(n, kv_heads, -1, -1)
    out = attention(queries, keys, values, None, causal=True)  # (n, heads, width, d): row i sees length + i + 1
    last = [6, 3, 4]
    for head in range(heads):
        probe = RetrievalProbe(layer=0, head=head, first=5, frames=12)
        probs = answer_attention(queries, keys, last, length, probe)
        assert probs.shape == (n, 13)
        for r, p in enumerate(last):
            want = out[r, head, p]
            torch.testing.assert_close(probs[r, :-1], want[5:17])
            torch.testing.assert_close(probs[r, -1], want.sum() - want[5:17].sum())
            assert want[length + p + 1 :].abs().max() < 1e-6  # nothing after its own position
    assert not torch.allclose(answer_attention(queries, keys, last, length, RetrievalProbe(0, 0, 5, 12)),
                              answer_attention(queries, keys, last, length, RetrievalProbe(0, 2, 5, 12)))


def test_retrieval_targets_by_hand():
    present = np.zeros((5, len(PAIRS)))
    green_triangle = PAIRS.index(("green", "triangle"))
    present[[1, 3], green_triangle] = 1
    got = retrieval_target("Is there a green triangle?", "presence", present, np.zeros((5, 4)))
    assert got.tolist() == [False, True, False, True, False]
    counts = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 2]])
    order = "Which appears first, the {} or the {}?"
    assert retrieval_target(order.format("square", "circle"), "order", present, counts).tolist() == [
        False, True, False, False, False]  # the square alone, before any circle
    assert not retrieval_target(order.format("circle", "square"), "order", present, counts).any()
    assert retrieval_target(order.format("star", "circle"), "order", present, counts).tolist() == [False] * 5
    assert retrieval_target(order.format("circle", "star"), "order", present, counts).tolist() == [
        False, False, True, True, False]
    assert retrieval_target("What word is shown?", "text", present, counts) is None


@pytest.mark.parametrize("seed", [21, 77])
def test_retrieval_targets_exist_exactly_when_the_answer_is_yes_or_the_first_named_kind(seed):
    """Checked against `range_questions`' answers, which come from the timeline's events, not the frame truth."""
    video = load_video(seed, 150, 32)
    facts = timeline_facts(video.timeline)
    checked = Counter()
    for start, length in [(s, n) for s in range(0, 140, 3) for n in (1, 6, 40, 150)]:
        end = min(149, start + length - 1)
        present, counts = video.probes["present"][start : end + 1], video.probes["counts"][start : end + 1]
        for q in range_questions(facts, start, end):
            target = retrieval_target(q.question, q.family, present, counts)
            if q.family == "presence":
                assert target.any() == (q.answer == "yes")
            elif q.family == "order":
                first_named = q.question.removeprefix("Which appears first, the ").split(" or ")[0]
                assert target.any() == (q.answer == first_named)
            else:
                assert target is None
                continue
            checked[(q.family, bool(target.any()))] += 1
    assert min(checked.values()) >= 10 and len(checked) == 4


def test_retrieval_loss_is_minus_log_mass_on_the_evidence():
    probs = torch.tensor([[0.1, 0.6, 0.1, 0.2], [0.05, 0.05, 0.1, 0.8], [0.25, 0.25, 0.25, 0.25]])
    targets = [np.array([False, True, True]), np.array([False, False, False]), None]
    loss = retrieval_loss(probs, targets)
    torch.testing.assert_close(loss, -(torch.log(torch.tensor(0.7)) + torch.log(torch.tensor(0.8))) / 2)
    assert retrieval_loss(probs, [None, None, None]) is None


@shipped
@pytest.mark.parametrize(("layer", "head"), [(4, 0), (-1, 0), (1, 4)])
def test_a_retrieval_head_that_does_not_exist_is_refused_before_any_work(layer, head):
    from research.training.train import TrainConfig, stage2

    engine = open_engine(choose_model(str(SHIPPED_MODEL_DIR)))
    cfg = TrainConfig(retrieval_weight=1.0, retrieval_layer=layer, retrieval_head=head)
    with pytest.raises(ValueError, match="does not exist"):
        stage2(engine.model, engine.tokenizer, [], cfg, lambda row: None, np.random.default_rng(0))
    stage_off = TrainConfig(retrieval_weight=0.0, retrieval_layer=layer, retrieval_head=head, stage2_steps=0)
    stage2(engine.model, engine.tokenizer, [], stage_off, lambda row: None, np.random.default_rng(0))  # unused: fine
