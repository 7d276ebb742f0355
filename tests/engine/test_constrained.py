"""Answers held to a JSON schema (llguidance): with a tiny random-weight model and with the shipped demo model,
greedy and sampled, every answer that was not cut by its token limit parses and validates against its schema;
the mask only ever lets allowed tokens through; log-probs are the raw logits'; without a grammar decoding is what
a plain greedy loop gives; bad schemas are ValueErrors."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from vidmini.demo.tiny import build_tiny_checkpoint
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.constrained import JsonConstraint, ll_tokenizer
from vidmini.engine.generate import SamplingConfig, decode, prefill
from vidmini.engine.inference import Engine
from vidmini.engine.load import SHIPPED_MODEL_DIR

QUESTION = "What colour is the square?"
LIMIT = 160

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "score": {"type": "number", "minimum": -5, "maximum": 5},
            "colour": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "score", "colour", "tags"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 10},
            "where": {
                "type": "object",
                "properties": {"start": {"type": "integer", "minimum": 0, "maximum": 600},
                               "end": {"type": "integer", "minimum": 0, "maximum": 600},
                               "sure": {"type": "boolean"}},
                "required": ["start", "end", "sure"],
                "additionalProperties": False,
            },
        },
        "required": ["answer", "where"],
        "additionalProperties": False,
    },
    "integers": {
        "type": "object",
        "properties": {"count": {"type": "integer", "minimum": 3, "maximum": 17},
                       "year": {"type": "integer", "minimum": 1990, "maximum": 2030},
                       "neg": {"type": "integer", "minimum": -40, "maximum": -7}},
        "required": ["count", "year", "neg"],
        "additionalProperties": False,
    },
    "top_level_integer": {"type": "integer", "minimum": 10, "maximum": 250},
    "array_of_objects": {
        "type": "array",
        "items": {"type": "object", "properties": {"kind": {"enum": ["circle", "square", "star"]},
                                                   "n": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["kind", "n"], "additionalProperties": False},
        "minItems": 1, "maxItems": 3,
    },
}

SAMPLINGS = [dict(temperature=0.0)] + [dict(temperature=t, top_p=p, seed=s)
                                       for s in (0, 1, 2) for t, p in ((1.0, 1.0), (1.5, 0.9))]


def make_engine(directory) -> Engine:
    loaded = load_checkpoint(directory)
    return Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    engine = make_engine(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3))
    frames = np.random.default_rng(0).integers(0, 256, (4, 36, 64, 3), dtype=np.uint8)
    return engine, engine.encode_frames(engine.frame_pixels(frames))


@pytest.fixture(scope="module")
def demo():
    if not (SHIPPED_MODEL_DIR / "config.json").exists():
        pytest.skip("no shipped demo model")
    from vidmini.demo.render import render_samples
    from vidmini.demo.world import generate_timeline
    from vidmini.engine.load import choose_model, open_engine

    choice = choose_model(str(SHIPPED_MODEL_DIR))
    engine = open_engine(choice)
    frames = np.stack([f for _, f in render_samples(generate_timeline(5, 8), fps=1.0)])
    return engine, engine.encode_frames(engine.frame_pixels(frames))


def run(engine: Engine, states, sampling: SamplingConfig, question: str = QUESTION) -> tuple[list[int], list[float]]:
    events = list(engine.answer(question, states, sampling))
    return [e.token_id for e in events], [e.logprob for e in events]


def constrained(engine: Engine, schema: dict, limit: int = LIMIT, **kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=limit, stop_ids=engine.eos_ids,
                          grammar=JsonConstraint(engine.tokenizer, schema, engine.eos_ids), **kw)


def check_answers(engine: Engine, states, question: str) -> int:
    """Every schema × sampling: complete answers validate; returns how many were complete."""
    complete = 0
    for name, schema in SCHEMAS.items():
        for kw in SAMPLINGS:
            ids, _ = run(engine, states, constrained(engine, schema, **kw), question)
            text = engine.tokenizer.decode(ids, skip_special_tokens=True)
            if len(ids) == LIMIT:
                try:
                    json.loads(text)
                except ValueError:
                    continue  # cut by the token limit
            value = json.loads(text)
            jsonschema.validate(value, schema)
            assert not set(ids) & set(engine.eos_ids), (name, kw)
            complete += 1
    return complete


def test_tiny_model_answers_validate(tiny):
    engine, states = tiny
    total = len(SCHEMAS) * len(SAMPLINGS)
    assert check_answers(engine, states, QUESTION) >= total * 3 // 4  # bounded schemas: nearly all complete


def test_demo_model_answers_validate(demo):
    engine, states = demo
    total = len(SCHEMAS) * len(SAMPLINGS)
    assert check_answers(engine, states, "What colour is the background?") >= total * 3 // 4


def test_json_object_and_any_value(tiny):
    engine, states = tiny
    for schema in ({"type": "object"}, {}):
        for kw in SAMPLINGS[:3]:
            ids, _ = run(engine, states, constrained(engine, schema, limit=400, **kw))
            text = engine.tokenizer.decode(ids, skip_special_tokens=True)
            if len(ids) < 400:
                value = json.loads(text)
                assert schema == {} or isinstance(value, dict)


def test_an_answer_ends_when_the_grammar_is_complete(tiny):
    """A constant leaves the model no choice: exactly its tokens, then the answer stops by itself: no stop ids
    are set, so without the grammar the answer runs to its limit."""
    engine, states = tiny
    plain, _ = run(engine, states, SamplingConfig(max_new_tokens=40))
    assert len(plain) == 40
    grammar = JsonConstraint(engine.tokenizer, {"const": {"word": "MAP"}})
    ids, _ = run(engine, states, SamplingConfig(max_new_tokens=40, grammar=grammar))
    assert engine.tokenizer.decode(ids) == '{"word": "MAP"}' and grammar.done


def test_logprobs_are_of_the_raw_logits(tiny):
    engine, states = tiny
    first = engine.first_logits(QUESTION, states)
    raw = torch.log_softmax(first.float(), dim=-1)
    sampling = constrained(engine, SCHEMAS["integers"], logprobs=3)
    events = list(engine.answer(QUESTION, states, sampling))
    assert events and events[0].logprob == pytest.approx(float(raw[events[0].token_id]), abs=1e-5)
    top_ids = raw.topk(3).indices.tolist()
    assert [i for i, _ in events[0].top] == top_ids
    assert engine.tokenizer.decode([events[0].token_id]) == "{"  # forced, whatever the raw logits prefer


class OnlyThese:
    """A stand-in grammar: only `ids` are ever allowed; never done."""

    def __init__(self, ids):
        self.ids, self.seen, self.done = torch.tensor(ids), [], False

    def mask(self, logits):
        out = torch.full_like(logits, float("-inf"))
        out[self.ids] = logits[self.ids]
        return out

    def advance(self, token):
        self.seen.append(token)


class AllowAll(OnlyThese):
    def mask(self, logits):
        return logits


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, seed=4), dict(temperature=0.7, top_p=0.5, seed=5)])
def test_the_mask_applies_to_greedy_sampled_and_top_p(tiny, kw):
    engine, states = tiny
    allowed = [11, 57, 300, 301, 500]
    grammar = OnlyThese(allowed)
    ids, _ = run(engine, states, SamplingConfig(max_new_tokens=30, grammar=grammar, **kw))
    assert len(ids) == 30 and set(ids) <= set(allowed) and grammar.seen == ids


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, seed=4), dict(temperature=0.7, top_p=0.5, seed=5)])
def test_a_grammar_that_allows_everything_changes_nothing(tiny, kw):
    engine, states = tiny
    plain = run(engine, states, SamplingConfig(max_new_tokens=30, **kw))
    masked = run(engine, states, SamplingConfig(max_new_tokens=30, grammar=AllowAll([]), **kw))
    assert plain == masked and len(set(plain[0])) > 1


def test_without_a_grammar_decode_is_a_plain_greedy_loop(tiny):
    """Reference: argmax over the raw logits, fed back one token at a time, written out here."""
    engine, states = tiny
    model = engine.model
    steps = 25
    first, cache, _ = engine._prefill_question(QUESTION, states, None, steps)
    start = cache.length
    want, logits = [], first
    for _ in range(steps):
        token = int(torch.argmax(logits))
        want.append(token)
        logits = prefill(model, model.embed(torch.tensor([[token]], device=model.device)), cache)
    cache.length = start
    first2, cache2, _ = engine._prefill_question(QUESTION, states, None, steps)
    got = [e.token_id for e in decode(model, first2, cache2, SamplingConfig(max_new_tokens=steps))]
    assert got == want and len(set(want)) > 1
    assert got == run(engine, states, SamplingConfig(max_new_tokens=steps))[0]


@pytest.mark.parametrize("schema", [
    {"type": "foo"},
    {"$ref": "#/definitions/nowhere"},
    {"type": "string", "pattern": "(("},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 2}}, "required": ["a"]},
])
def test_a_bad_schema_is_a_one_line_value_error(tiny, schema):
    engine, _ = tiny
    with pytest.raises(ValueError) as info:
        JsonConstraint(engine.tokenizer, schema, engine.eos_ids)
    message = str(info.value)
    assert message.startswith("invalid JSON schema") and "\n" not in message


def test_a_schema_that_is_not_an_object_is_a_value_error(tiny):
    engine, _ = tiny
    for schema in ([1], "x", None):
        with pytest.raises(ValueError):
            JsonConstraint(engine.tokenizer, schema, engine.eos_ids)


def test_the_llguidance_tokenizer_is_built_once_per_tokenizer(tiny, tmp_path):
    engine, _ = tiny
    assert ll_tokenizer(engine.tokenizer, engine.eos_ids) is ll_tokenizer(engine.tokenizer, engine.eos_ids)
    other = make_engine(build_tiny_checkpoint(tmp_path / "other", seed=4)).tokenizer
    assert ll_tokenizer(other, engine.eos_ids) is not ll_tokenizer(engine.tokenizer, engine.eos_ids)

