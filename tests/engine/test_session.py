"""Video sessions (issue 5): the cached `all` policy equals the reference computation, prefix caches of growing
sources, time ranges, the tier C working set, many sessions on one model, the CLI's --json and --no-cache."""

from __future__ import annotations

import gc
import json
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from vidmini.demo.tiny import build_tiny_checkpoint
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.generate import SamplingConfig
from vidmini.engine.inference import Engine
from vidmini.engine.manager import SessionManager
from vidmini.engine.session import Policy, VideoSession, uniform_pick
from vidmini.engine.timerange import (
    QUESTION_TIME_WINDOW_S,
    TimeRange,
    format_time,
    parse_time,
    range_from_question,
    times_in_question,
)

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "videos"
QUESTION = "What colour is the square?"
OTHER = "How many circles are there?"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def greedy(n: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, stop_ids=())


def random_frames(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    loaded = load_checkpoint(build_tiny_checkpoint(tmp_path_factory.mktemp("session_tiny"), seed=11))
    return Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids, encode_batch=50)


@pytest.fixture(scope="module")
def video300(engine):
    """300 frames at 0.5 s spacing (t = 0, 0.5, … 149.5), their pixels and encoded states."""
    pixels = engine.frame_pixels(random_frames(1, 300))
    return pixels, engine.encode_frames(pixels), [0.5 * i for i in range(300)]


# ---- the exact policy ---------------------------------------------------------------------------------------------
def test_all_policy_equals_the_full_computation_on_300_frames(engine, video300):
    pixels, states, ts = video300
    session = VideoSession.from_states(engine, states, ts, chunk_frames=32)
    full = engine.first_logits_full(pixels, QUESTION)
    cached = session.first_logits(QUESTION, policy="all")
    assert (cached - full).abs().max().item() < 1e-4
    assert rel_err(cached, full) < 1e-5
    expected = [e.token_id for e in engine.forward_full(pixels, QUESTION, greedy(12))]
    first = session.ask(QUESTION, policy="all", sampling=greedy(12)).result()
    assert first.token_ids == expected and len(expected) == 12
    assert first.prefix_cache_hit and first.exact_prefix and first.policy == "all"  # first_logits built it
    assert first.frames == list(range(300)) and first.fused_frames == list(range(300)) and first.range is None
    assert first.ttft_ms > 0 and first.tokens_per_s > 0
    # a second question reuses the prefix cache and is still the reference's answer
    second = session.ask(OTHER, policy="all", sampling=greedy(12)).result()
    assert second.prefix_cache_hit
    assert second.token_ids == [e.token_id for e in engine.forward_full(pixels, OTHER, greedy(12))]
    # ... and the first question again, after the cache was rolled back
    assert session.ask(QUESTION, policy="all", sampling=greedy(12)).result().token_ids == expected
    # the comparison is not vacuous: fusing Q over a subset changes the logits
    subset = session.first_logits(QUESTION, policy="uniform:8")
    assert rel_err(subset, full) > 1e-4


def test_policies_resolve_and_subsets_are_measured(engine, video300):
    _, states, ts = video300
    per_frame = sum(k[0].numel() * k.element_size() for k in states.keys + states.values)
    roomy = VideoSession.from_states(engine, states, ts, prefusion_budget_bytes=300 * per_frame)
    assert roomy.ask(QUESTION, sampling=greedy(1)).result().policy == "all"  # auto: the states fit
    tight = VideoSession.from_states(engine, states, ts, prefusion_budget_bytes=299 * per_frame, auto_k=10)
    got = tight.ask(QUESTION, sampling=greedy(1)).result()
    assert got.policy == "uniform:10" and got.policy_requested == "auto"
    assert got.fused_frames == uniform_pick(list(range(300)), 10) and len(got.fused_frames) == 10
    assert got.fused_frames[0] == 0 and got.fused_frames[-1] == 299
    assert len(got.frames) == 300  # the LLM still sees every frame token
    # retrieved:K uses the picker; without one it is uniform, and says so
    picked = VideoSession.from_states(engine, states, ts, picker=lambda q, frames, k: list(frames)[-k:])
    r = picked.ask(QUESTION, policy="retrieved:5", sampling=greedy(1)).result()
    assert r.fused_frames == [295, 296, 297, 298, 299] and r.policy == "retrieved:5"
    assert roomy.ask(QUESTION, policy="retrieved:5", sampling=greedy(1)).result().policy == "uniform:5"
    # the deviation of a subset from `all` is a number, smaller for a larger subset
    exact = roomy.fused_question(QUESTION, policy="all").flatten()
    cos = {k: float(torch.nn.functional.cosine_similarity(
        roomy.fused_question(QUESTION, policy=f"uniform:{k}").flatten(), exact, dim=0)) for k in (4, 150)}
    assert cos[4] < cos[150] < 1.0
    assert roomy.fused_question(QUESTION, policy="uniform:300").allclose(roomy.fused_question(QUESTION, policy="all"))
    for bad in ("some", "uniform", "uniform:0", "all:3", "retrieved:x"):
        with pytest.raises(ValueError):
            Policy.parse(bad)
    assert str(Policy.parse("uniform:7")) == "uniform:7"


# ---- time ranges --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [
    ("1:02:03", 3723.0), ("62:03", 3723.0), ("3723", 3723.0), ("3723.5", 3723.5), ("0:00:00", 0.0),
    ("1:05", 65.0), (" 10 ", 10.0), ("0:59.25", 59.25), (12, 12.0), (3.5, 3.5),
])
def test_parse_time_good(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:60", "1:02:60", "-5", "1::3", ":30", "1:2:3:4", "1:030", "1.5:00",
                                  "12s", float("nan"), -1, "1:00:00:00"])
def test_parse_time_bad(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_ranges_and_times_in_questions():
    with pytest.raises(ValueError, match="before it starts"):
        TimeRange(20, 10)
    assert format_time(3723.5) == "1:02:03.5" and parse_time(format_time(3723.5)) == 3723.5
    assert times_in_question("what happens at 1:05:00?") == [3900.0]
    assert times_in_question("between 1:00 and 2:30, how many dogs? (3 dogs, 7:75)") == [60.0, 150.0]
    assert times_in_question("how many dogs are there, 3 or 4?") == []
    r = range_from_question("what happens at 1:05:00?")
    assert (r.start, r.end, r.source) == (3900 - QUESTION_TIME_WINDOW_S, 3900 + QUESTION_TIME_WINDOW_S, "question")
    assert range_from_question("at 0:05 what is red?").start == 0.0  # clamped at the start
    assert TimeRange(1.0, 2.0).frame_span([0.0, 1.0, 1.5, 2.0, 2.5]) == range(1, 4)
    with pytest.raises(ValueError, match="no frames between"):
        TimeRange(3.0, 4.0).frame_span([0.0, 1.0, 2.0])


def test_time_range_answers_use_exactly_the_frames_in_range(engine, video300):
    pixels, states, ts = video300
    session = VideoSession.from_states(engine, states, ts)
    got = session.ask(QUESTION, start="0:10", end="20.2", policy="all", sampling=greedy(8)).result()
    inside = [i for i, t in enumerate(ts) if 10 <= t <= 20.2]
    assert got.frames == inside == list(range(20, 41)) and got.fused_frames == inside
    assert got.timestamps == [ts[i] for i in inside]
    assert (got.range.start, got.range.end, got.range.source) == (10.0, 20.2, "explicit")
    assert got.token_ids == [e.token_id for e in engine.forward_full(pixels[20:41], QUESTION, greedy(8))]
    ranged = session.first_logits(QUESTION, start=10, end=20.2)
    assert rel_err(ranged, engine.first_logits_full(pixels[20:41], QUESTION)) < 1e-5
    assert rel_err(ranged, engine.first_logits_full(pixels, QUESTION)) > 1e-4
    assert range(20, 41) in session.cached_frame_sets and range(300) not in session.cached_frame_sets
    # a time named in the question picks a range around it; an explicit range wins over it
    q = "what happens at 1:00?"
    by_text = session.ask(q, policy="all", sampling=greedy(2)).result()
    assert by_text.range.source == "question"
    assert by_text.frames == [i for i, t in enumerate(ts) if 45 <= t <= 75]
    assert session.ask(q, start=0, end=1, sampling=greedy(1)).result().frames == [0, 1, 2]
    assert session.ask(q, question_times=False, sampling=greedy(1)).result().frames == list(range(300))
    # only one bound: from there to the end / from the start to there
    assert session.ask(QUESTION, start="2:29", sampling=greedy(1)).result().frames == [298, 299]
    assert session.ask(QUESTION, end="0:01", sampling=greedy(1)).result().frames == [0, 1, 2]
    for start, end in [("1:00", "0:30"), ("10:00", "11:00"), ("1:70", None)]:
        with pytest.raises(ValueError):
            session.ask(QUESTION, start=start, end=end)
    # the LRU bound on prefix caches holds
    assert len(session.cached_frame_sets) <= session.max_prefix_caches


# ---- growing sources ----------------------------------------------------------------------------------------------
def test_growing_source_exact_rebuild_and_incremental_deviation(engine, video300):
    pixels, states, ts = video300
    at_once = VideoSession.from_states(engine, states, ts)
    grown = VideoSession.from_states(engine, states.select(slice(0, 200)), ts[:200])
    grown.ask(QUESTION, sampling=greedy(1)).result()  # builds the 200-frame prefix cache
    grown.append(states.select(slice(200, 300)), ts[200:])
    assert grown.num_frames == 300
    a = grown.ask(QUESTION, policy="all", sampling=greedy(10)).result()
    b = at_once.ask(QUESTION, policy="all", sampling=greedy(10)).result()
    assert a.token_ids == b.token_ids and a.exact_prefix and not a.prefix_cache_hit
    ea, eb = grown.prefix_entry(range(300))[0], at_once.prefix_entry(range(300))[0]
    assert ea.length == eb.length == len(engine.prefix_ids) + 300
    torch.testing.assert_close(ea.cache.keys[..., : ea.length, :], eb.cache.keys[..., : eb.length, :],
                               rtol=1e-5, atol=1e-5)
    assert rel_err(grown.first_logits(OTHER), engine.first_logits_full(pixels, OTHER)) < 1e-5
    with pytest.raises(ValueError, match="after the existing"):
        grown.append(states.select(slice(0, 2)), [1.0, 2.0])

    # incremental: the earlier prefix is kept as it was, only the new frames' tokens are prefilled
    live = VideoSession.from_states(engine, states.select(slice(0, 200)), ts[:200], live_mode="incremental")
    live.ask(QUESTION, sampling=greedy(1)).result()
    old = live.prefix_entry(range(200))[0]
    old_len, old_keys = old.length, old.cache.keys[..., : old.length, :].clone()
    live.append(states.select(slice(200, 300)), ts[200:])
    entry, hit = live.prefix_entry(range(300))
    assert hit and not entry.exact and entry.length == old_len + 100
    assert torch.equal(entry.cache.keys[..., :old_len, :], old_keys)  # nothing earlier recomputed
    stale = states.prefix_text[:200].float().mean(0)
    exact = states.prefix_text.float().mean(0)
    expected_cos = float(torch.nn.functional.cosine_similarity(stale.flatten(), exact.flatten(), dim=0))
    assert entry.prefix_cosine == pytest.approx(expected_cos, abs=1e-6) and entry.prefix_cosine < 1 - 1e-6
    got = live.ask(QUESTION, policy="all", sampling=greedy(10)).result()
    assert not got.exact_prefix and got.prefix_cosine == entry.prefix_cosine
    # its keys/values are those of [stale mean P', c'_1 … c'_300] computed in one go
    from vidmini.engine.generate import allocate_cache, prefill

    seq = torch.cat([stale.to(states.prefix_text.dtype), states.compressed.flatten(0, 1)])[None]
    ref = allocate_cache(engine.model, seq.shape[1])
    prefill(engine.model, seq, ref)
    torch.testing.assert_close(entry.cache.keys[..., : entry.length, :], ref.keys, rtol=1e-4, atol=1e-5)
    live.rebuild_exact()
    again = live.ask(QUESTION, policy="all", sampling=greedy(10)).result()
    assert again.exact_prefix and again.token_ids == b.token_ids


def test_subset_is_gathered_once_and_equals_fusing_those_frames(engine, video300):
    from vidmini.engine.fusion import prefuse_question

    _, states, ts = video300
    per_frame = sum(k[0].numel() * k.element_size() for k in states.keys + states.values)
    session = VideoSession.from_states(engine, states, ts, chunk_frames=32, prefusion_budget_bytes=40 * per_frame)
    picks = uniform_pick(list(range(300)), 16)
    ws = session.working_set
    for question in (QUESTION, OTHER, QUESTION + " Tell me more about the colours you can see there."):
        ids = engine.prompt(question).question
        expected = prefuse_question(engine.model, states.select(picks), ids)
        loads = ws.stats.loads
        got = session.fused_question(question, policy="uniform:16")
        assert rel_err(got.float(), expected.float()) < 1e-6
        if question != QUESTION:  # gathered by the first question, reused since (a longer one grows its room)
            assert ws.stats.loads == loads
    assert ws.resident_bytes <= 40 * per_frame  # the kept subset counts against the tier-C budget
    assert ws.subset(tuple(picks)) is not None
    # a subset larger than the budget is computed but not kept
    small = VideoSession.from_states(engine, states, ts, chunk_frames=32, prefusion_budget_bytes=8 * per_frame)
    small.fused_question(QUESTION, policy="uniform:16")
    assert small.working_set.subset(tuple(picks)) is None and small.working_set.resident_bytes <= 8 * per_frame


# ---- tier C from a store ------------------------------------------------------------------------------------------
def test_store_session_working_set_under_budget(engine, tmp_path):
    from vidmini.ingest.job import IngestOptions, load_states, run_ingest
    from vidmini.store.session import open_store_session, store_states
    from vidmini.store.video_store import StoreCatalog

    result = run_ingest(str(FIXTURES / "safari.mp4"), engine, tmp_path, IngestOptions(chunk_frames=4))
    store = StoreCatalog(tmp_path).get(result.video_id)
    source = store_states(store)
    assert source.starts == [0, 4, 8, 11] and source.num_chunks == 3
    chunk_bytes = 4 * source.frame_bytes
    small = open_store_session(engine, store, prefusion_budget_bytes=2 * chunk_bytes)
    whole = VideoSession.from_states(engine, load_states(store), store.timestamps().tolist())
    assert small.ask(QUESTION, sampling=greedy(1)).result().policy == "uniform:64"  # auto: 11 frames do not fit
    ws = small.working_set
    assert ws.resident_bytes <= 2 * chunk_bytes
    ws.clear()
    ws.stats.loads = ws.stats.evictions = 0
    for _ in range(2):  # all: every chunk streams through the two-chunk working set
        got = small.ask(QUESTION, policy="all", sampling=greedy(8)).result()
        assert got.token_ids == whole.ask(QUESTION, policy="all", sampling=greedy(8)).result().token_ids
    assert ws.stats.loads == 6 and ws.stats.evictions == 4  # LRU over 3 chunks with room for 2 thrashes
    assert ws.resident_chunks == [1, 2] and ws.resident_bytes <= 2 * chunk_bytes
    assert rel_err(small.first_logits(OTHER), whole.first_logits(OTHER)) < 1e-5  # float rounding: the two sum the frames in different batches
    # a range inside chunk 0 only touches chunk 0
    ws.clear()
    ws.stats.loads = 0
    small.ask(QUESTION, start=0, end=2, policy="all", sampling=greedy(1)).result()
    assert ws.resident_chunks == [0] and ws.stats.loads == 1
    roomy = open_store_session(engine, store)
    assert roomy.ask(QUESTION, sampling=greedy(8)).result().policy == "all"


# ---- many users ---------------------------------------------------------------------------------------------------
def two_videos(engine):
    out = {}
    for name, seed, n in (("a", 2, 60), ("b", 3, 45)):
        out[name] = (engine.encode_frames(engine.frame_pixels(random_frames(seed, n))), [float(i) for i in range(n)])
    return out


def opener(engine, states, ts):
    return lambda **kw: VideoSession.from_states(engine, states, ts, **kw)


def test_concurrent_sessions_give_the_same_answers_as_alone(engine):
    videos = two_videos(engine)
    sampled = SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, stop_ids=(), seed=5)
    jobs = [("a", QUESTION, greedy(10)), ("b", OTHER, greedy(10)), ("a", OTHER, sampled), ("b", QUESTION, sampled)]
    alone = {}
    for key, q, s in jobs:
        sess = VideoSession.from_states(engine, *videos[key])
        alone[(key, q)] = sess.ask(q, policy="all", sampling=s).result().token_ids
    assert len({tuple(v) for v in alone.values()}) == 4  # different questions, different answers
    manager = SessionManager(engine, device_budget_bytes=1 << 30)
    for key in videos:
        manager.open(key, opener(engine, *videos[key]))
    results: dict = {}
    errors: list = []

    def worker(key: str, q: str, s: SamplingConfig) -> None:  # decode steps batched (tests/engine/test_batcher.py)
        try:
            for _ in range(3):
                stream = manager.ask(key, q, policy="all", sampling=s)
                results.setdefault((key, q), []).append(stream.result().token_ids)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for job_key, runs in results.items():
        assert runs == [alone[job_key]] * 3


def test_eviction_reload_and_memory_release(engine):
    videos = two_videos(engine)
    probe = VideoSession.from_states(engine, *videos["a"])
    probe.ask(QUESTION, sampling=greedy(1)).result()
    one_session = probe.device_bytes()
    manager = SessionManager(engine, device_budget_bytes=int(one_session * 1.5))
    a = manager.open("a", opener(engine, *videos["a"]))
    first = manager.answer("a", QUESTION, sampling=greedy(10))
    logits = a.first_logits(OTHER)
    watched = weakref.ref(a.prefix_entry(range(60))[0].cache.keys)  # a tensor only the session holds
    manager.open("b", opener(engine, *videos["b"]))
    manager.answer("b", OTHER, sampling=greedy(10))
    assert manager.live_keys == ["b"] and manager.stats.evictions == 1 and a.closed
    gc.collect()
    assert watched() is None  # a's device tensors were released
    assert a.device_bytes() == 0
    with pytest.raises(RuntimeError, match="closed"):
        a.ask(QUESTION)
    again = manager.answer("a", QUESTION, sampling=greedy(10))  # reopened from its opener
    assert manager.stats.reloads == 1 and manager.live_keys == ["a"]
    assert again.token_ids == first.token_ids and not again.prefix_cache_hit
    assert torch.equal(manager.session("a").first_logits(OTHER), logits)
    assert manager.device_bytes() <= int(one_session * 1.5)
    manager.close_all()
    assert manager.device_bytes() == 0 and manager.live_keys == []
    with pytest.raises(KeyError):
        manager.session("a")


# ---- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_json_fields_ranges_and_no_cache(tmp_path, monkeypatch, capsys):
    import vidmini.cli.main

    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", seed=4)
    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path / "home"))
    video = str(FIXTURES / "safari.mp4")

    def ask(*extra: str) -> dict:
        assert vidmini.cli.main.main(["ask", video, QUESTION, "--model", str(ckpt), "--json", "--max-new-tokens", "6",
                             *extra]) == 0
        return json.loads(capsys.readouterr().out)

    cached = ask("--from", "0:02", "--to", "5", "--policy", "all")
    assert {"answer", "token_ids", "range", "frame_indices", "fused_frames", "policy", "ttft_ms",
            "tokens_per_s"} <= set(cached)
    assert cached["frames"] == 4 and cached["timestamps"] == [2.0, 3.0, 4.0, 5.0]
    assert cached["frame_indices"] == [2, 3, 4, 5] and cached["fused_frames"] == [2, 3, 4, 5]
    assert cached["range"] == {"start": 2.0, "end": 5.0, "source": "explicit"} and cached["policy"] == "all"
    assert cached["ttft_ms"] > 0 and len(cached["token_ids"]) == 6
    reference = ask("--from", "0:02", "--to", "5", "--no-cache")
    assert reference["policy"] == "reference" and reference["timestamps"] == [2.0, 3.0, 4.0, 5.0]
    assert reference["token_ids"] == cached["token_ids"]
    whole = ask("--policy", "uniform:3")  # a stored video by its file again: reused, whole video
    assert whole["frames"] == 11 and whole["fused_frames"] == [0, 5, 10] and whole["range"] is None
    by_id = ask("--policy", "all")
    assert by_id["video_id"] == whole["video_id"] is not None
    assert vidmini.cli.main.main(["ask", by_id["video_id"][:10], QUESTION, "--model", str(ckpt), "--json",
                         "--max-new-tokens", "6", "--policy", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == by_id["token_ids"]
    for bad in (["--from", "9", "--to", "3"], ["--policy", "most"], ["--from", "1:99"]):  # caught before loading
        assert vidmini.cli.main.main(["ask", video, QUESTION, "--model", str(ckpt), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vidmini: error:")
    assert vidmini.cli.main.main(["ask", video, QUESTION, "--model", str(ckpt), "--from", "30"]) == 2  # past the end
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("vidmini: error: no frames between 0:00:30 and 0:00:30")
    assert "Traceback" not in err
