"""Continuous batching (vidmini/engine/batcher.py): questions from many threads decode together in the engine's
one decode thread and each gets exactly the tokens it gets asked alone — greedy and seeded-sampled, on different
videos and several on the same video (its prefix cache in place for one, copies for the others), mixed lengths,
a grammar-constrained answer beside plain ones, one cancelled mid-way, one joining while others decode, a full
batch whose waiting answer takes a freed slot — with a tiny random-weight model and with the shipped demo model
over stored videos. `DecodeBatcher.hold/allow/release` line batches up exactly, so that the decode steps are
known to have been shared (the batcher's counters), without any timing assertion."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from vidmini.demo.tiny import build_tiny_checkpoint
from vidmini.engine.batcher import DecodeBatcher, DecodeSequence, default_step_threads
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.constrained import JsonConstraint
from vidmini.engine.generate import SamplingConfig, allocate_cache, decode_step, prefill
from vidmini.engine.inference import Engine
from vidmini.engine.load import SHIPPED_MODEL_DIR
from vidmini.engine.manager import SessionManager
from vidmini.engine.session import AnswerStream, SessionAnswer, VideoSession

WAIT_S = 120
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["colour", "n"], "additionalProperties": False}


def greedy(n: int, stop: tuple[int, ...] = ()) -> Callable[[], SamplingConfig]:
    return lambda: SamplingConfig(max_new_tokens=n, stop_ids=stop)


def sampled(n: int, seed: int, temperature: float = 0.9, top_p: float = 0.9, logprobs: int = 0
            ) -> Callable[[], SamplingConfig]:
    return lambda: SamplingConfig(max_new_tokens=n, temperature=temperature, top_p=top_p, seed=seed, stop_ids=(),
                                  logprobs=logprobs)


@dataclass
class Job:
    """One question: on which session, and its sampling (built fresh per run: a grammar is stateful)."""

    key: str
    question: str
    sampling: Callable[[], SamplingConfig]
    start: float | None = None
    end: float | None = None

    def ask(self, manager: SessionManager, cancel: threading.Event | None = None) -> AnswerStream:
        return manager.ask(self.key, self.question, start=self.start, end=self.end, policy="all",
                           sampling=self.sampling(), cancel=cancel)


@dataclass
class Runner:
    """A stream iterated on a thread of its own, as a request thread does."""

    stream: AnswerStream
    ids: list[int] = field(default_factory=list)
    answer: SessionAnswer | None = None
    error: BaseException | None = None
    first: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Runner:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            for ev in self.stream:
                self.ids.append(ev.token_id)
                self.first.set()
            self.answer = self.stream.result()
        except BaseException as e:  # noqa: BLE001 - checked by `result`
            self.error = e
        finally:
            self.first.set()
            self.done.set()

    def result(self) -> SessionAnswer:
        assert self.done.wait(WAIT_S), "the answer did not end"
        if self.error is not None:
            raise self.error
        assert self.answer is not None and self.answer.token_ids == self.ids
        return self.answer


def alone(manager: SessionManager, jobs: list[Job]) -> list[list[int]]:
    """Each job asked by itself, one after another (every decode step a batch of one: today's path)."""
    out = []
    for job in jobs:
        out.append(job.ask(manager).result().token_ids)
        assert manager.engine.batcher.in_flight == 0
    return out


def lined_up(manager: SessionManager, jobs: list[Job]) -> list[Runner]:
    """Every job prefilled (first token out) while the batcher holds, then released: its first step is one batch of
    all the jobs still going."""
    batcher = manager.engine.batcher
    batcher.hold()
    try:
        runners = [Runner(job.ask(manager)).start() for job in jobs]
        for r in runners:
            assert r.first.wait(WAIT_S)
    finally:
        batcher.release()
    return runners


def together(manager: SessionManager, jobs: list[Job]) -> list[Runner]:
    """Every job from its own thread at once, nothing held: prefills run beside decode steps."""
    gate = threading.Barrier(len(jobs))

    class Gated(Runner):
        def _run(self) -> None:
            gate.wait()
            super()._run()

    return [Gated(job.ask(manager)).start() for job in jobs]


def ids_of(runners: list[Runner]) -> list[list[int]]:
    return [r.result().token_ids for r in runners]


def no_question_in_flight(manager: SessionManager) -> None:
    assert manager.engine.batcher.in_flight == 0
    for key in manager.live_keys:
        sess = manager.session(key)
        assert not any(e.busy for e in sess._prefixes.values()) and sess._copy_bytes == 0


# ---- the tiny random-weight model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory) -> tuple[Engine, dict]:
    loaded = load_checkpoint(build_tiny_checkpoint(tmp_path_factory.mktemp("batcher_tiny"), seed=11))
    engine = Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids, encode_batch=50)
    videos = {}
    for key, seed, n in (("a", 2, 60), ("b", 3, 45), ("c", 4, 24)):
        frames = np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        videos[key] = engine.encode_frames(engine.frame_pixels(frames)), [float(i) for i in range(n)]
    return engine, videos


@pytest.fixture(scope="module")
def tiny(tiny_videos) -> SessionManager:
    """Three videos (60, 45 and 24 frames) in a session manager, as the library holds them."""
    engine, videos = tiny_videos
    manager = SessionManager(engine, device_budget_bytes=1 << 30)
    for key, (states, ts) in videos.items():
        manager.open(key, lambda states=states, ts=ts, **kw: VideoSession.from_states(engine, states, ts, **kw))
    return manager


Q1, Q2, Q3 = "What colour is the square?", "How many circles are there?", "Is there a red star?"


def tiny_greedy_jobs(engine: Engine) -> list[Job]:
    eos = engine.eos_ids
    return [
        Job("a", Q1, greedy(24)), Job("a", Q2, greedy(7)), Job("a", Q3, greedy(40)),  # three on one video
        Job("a", Q1, greedy(24)),  # the same question twice at once
        Job("a", Q2, greedy(16), start=10, end=30),  # a time range: its own prefix cache
        Job("b", Q2, greedy(31)), Job("b", Q1, greedy(3)), Job("c", Q3, greedy(12, stop=eos)),
        Job("c", Q1, greedy(1)), Job("b", Q3, greedy(0)),
    ]


def test_decode_step_is_one_forward_per_sequence_at_its_own_position(tiny):
    """The batched step against each sequence's own one-token prefill: same keys/values written, logits equal
    but for the last float bits."""
    model = tiny.engine.model
    d = model.config.llama.hidden_size
    gen = torch.Generator().manual_seed(0)
    caches = []
    for n in (5, 31, 12):
        cache = allocate_cache(model, n + 4)
        prefill(model, torch.randn(1, n, d, generator=gen) * 0.5, cache)
        caches.append(cache)
    tokens = [3, 17, 42]
    lone = []
    for tok, cache in zip(tokens, caches, strict=True):
        copy = allocate_cache(model, cache.capacity)
        copy.keys.copy_(cache.keys)
        copy.values.copy_(cache.values)
        copy.length = cache.length
        lone.append((prefill(model, model.embed(torch.tensor([[tok]])), copy), copy))
    batched = decode_step(model, tokens, caches)
    assert batched.shape == (3, model.config.llama.vocab_size)
    for b, (logits, copy) in enumerate(lone):
        assert caches[b].length == copy.length
        n = copy.length
        assert torch.allclose(caches[b].keys[:, :, :, :n], copy.keys[:, :, :, :n], atol=1e-5)
        assert (batched[b] - logits).abs().max().item() < 1e-4
        assert int(batched[b].argmax()) == int(logits.argmax())


def test_tiny_concurrent_greedy_answers_equal_asking_alone(tiny):
    jobs = tiny_greedy_jobs(tiny.engine)
    expected = alone(tiny, jobs)
    assert len({tuple(e) for e in expected if len(e) > 3}) >= 6  # different questions, different answers
    assert [len(e) for e in expected][:3] == [24, 7, 40] and expected[0] == expected[3] and expected[-1] == []
    batcher = tiny.engine.batcher
    batcher.reset_stats()
    assert ids_of(lined_up(tiny, jobs)) == expected
    # an answer of n tokens needs n - 1 steps (its first token comes from its prefill, on its own thread); all
    # started together, step k is one batch of every answer with more than k tokens
    sizes = [sum(len(e) - 1 >= k for e in expected) for k in range(1, max(len(e) for e in expected))]
    assert sizes[0] == 8 and batcher.max_batch_seen == 8 and batcher.steps == len(sizes)
    assert batcher.batch_sizes == Counter(sizes) and batcher.batched_steps == sum(n > 1 for n in sizes)
    no_question_in_flight(tiny)
    for _ in range(2):  # free-running: prefills beside decode steps, batches as they happen
        assert ids_of(together(tiny, jobs)) == expected
        no_question_in_flight(tiny)


def test_tiny_sampled_with_seeds_equal_asking_alone(tiny):
    jobs = [Job("a", Q1, sampled(20, seed=1)), Job("a", Q1, sampled(20, seed=2)),
            Job("a", Q2, sampled(33, seed=1, temperature=1.3, top_p=1.0, logprobs=3)),
            Job("b", Q3, sampled(9, seed=7)), Job("c", Q2, greedy(15)), Job("b", Q1, sampled(25, seed=3))]
    answers = [job.ask(tiny).result() for job in jobs]
    expected = [a.token_ids for a in answers]
    assert expected[0] != expected[1]  # the seed matters
    runners = lined_up(tiny, jobs)
    assert ids_of(runners) == expected
    got, want = runners[2].result().logprobs, answers[2].logprobs
    assert [[c["id"] for c in step] for step in got] == [[c["id"] for c in step] for step in want]
    assert np.allclose([[c["logprob"] for c in s] for s in got], [[c["logprob"] for c in s] for s in want], atol=1e-4)
    assert ids_of(together(tiny, jobs)) == expected
    no_question_in_flight(tiny)


def test_a_cancelled_answer_stops_and_the_others_finish_unchanged(tiny):
    jobs = [Job("a", Q1, greedy(30)), Job("a", Q2, greedy(30)), Job("b", Q3, greedy(30))]
    expected = alone(tiny, jobs)
    batcher = tiny.engine.batcher
    cancel = threading.Event()
    batcher.hold()
    try:
        runners = [Runner(job.ask(tiny, cancel if i == 1 else None)).start() for i, job in enumerate(jobs)]
        for r in runners:
            assert r.first.wait(WAIT_S)
        batcher.allow(3)  # three shared steps: every answer has its first token and three more
        assert batcher.in_flight == 3
        cancel.set()
        batcher.allow(1)  # the cancelled one leaves at this step, before its forward; its slot is free
        assert batcher.in_flight == 2
    finally:
        batcher.release()
    cut = runners[1].result()
    assert cut.cancelled and cut.token_ids == expected[1][:4]
    assert [r.result().token_ids for r in (runners[0], runners[2])] == [expected[0], expected[2]]
    no_question_in_flight(tiny)
    # the cancelled question's prefix cache (it had the video's cache in place or a copy) is whole again
    assert alone(tiny, jobs) == expected


def test_a_question_that_joins_while_others_decode(tiny):
    jobs = [Job("a", Q1, greedy(40)), Job("b", Q2, greedy(40))]
    late = Job("a", Q3, greedy(25))
    expected = alone(tiny, [*jobs, late])
    batcher = tiny.engine.batcher
    batcher.reset_stats()
    batcher.hold()
    try:
        runners = [Runner(job.ask(tiny)).start() for job in jobs]
        for r in runners:
            assert r.first.wait(WAIT_S)
        batcher.allow(10)
        assert batcher.steps == 10 and batcher.max_batch_seen == 2 and batcher.in_flight == 2
        joiner = Runner(late.ask(tiny)).start()  # prefilled on its thread while the others are mid-answer
        assert joiner.first.wait(WAIT_S)
        assert not any(r.done.is_set() for r in runners)
        batcher.allow(1)
        assert batcher.max_batch_seen == 3 and batcher.batch_sizes[3] == 1
    finally:
        batcher.release()
    assert ids_of([*runners, joiner]) == expected
    no_question_in_flight(tiny)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    done = threading.Event()
    for _ in range(WAIT_S * 100):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_questions_asked_together_are_prefilled_first_and_decode_as_one_batch(tiny):
    """Prefills first: while questions wait for the lock or are being prefilled, no decode step runs, so 8
    questions asked at once decode in one batch of 8 from their second token on (nothing held by the test but
    the lock that makes them arrive together)."""
    jobs = [Job(key, q, greedy(12)) for key in ("a", "b", "c") for q in (Q1, Q2, Q3)][:8]
    expected = alone(tiny, jobs)
    assert all(len(e) == 12 for e in expected)
    batcher = tiny.engine.batcher
    batcher.max_prefill_stall_s = WAIT_S  # never cut short here
    batcher.reset_stats()
    try:
        with tiny.lock:  # every question gets as far as waiting for the lock
            runners = [Runner(job.ask(tiny)).start() for job in jobs]
            wait_until(lambda: batcher._prefilling == len(jobs), "8 questions at the lock")
        got = ids_of(runners)
    finally:
        batcher.max_prefill_stall_s = 0.5
    assert got == expected
    assert batcher.batch_sizes == Counter({8: 11}) and batcher.steps == 11
    no_question_in_flight(tiny)


def test_a_decoding_answer_is_not_starved_by_a_prefill_that_waits(tiny):
    """The wait for prefills is bounded: an answer goes on decoding (one step per bound) while another question
    is stuck waiting for the lock, and ends with its tokens unchanged."""
    job = Job("a", Q1, greedy(6))
    expected = alone(tiny, [job])
    batcher = tiny.engine.batcher
    batcher.max_prefill_stall_s = 0.05
    try:
        runner = Runner(job.ask(tiny)).start()
        assert runner.first.wait(WAIT_S)
        with batcher.prefilling():  # a question that never gets further than the lock (held by nobody here)
            assert runner.done.wait(WAIT_S)
            assert batcher.stall_s > 0  # it did wait for the prefill, up to the bound each time
    finally:
        batcher.max_prefill_stall_s = 0.5
    assert runner.result().token_ids == expected[0]
    no_question_in_flight(tiny)


def test_a_grammar_constrained_answer_beside_plain_ones(tiny):
    engine = tiny.engine

    def constrained(**kw) -> Callable[[], SamplingConfig]:
        return lambda: SamplingConfig(max_new_tokens=60, stop_ids=engine.eos_ids, **kw,
                                      grammar=JsonConstraint(engine.tokenizer, SCHEMA, engine.eos_ids))

    jobs = [Job("a", Q1, greedy(30)), Job("a", Q2, constrained()), Job("b", Q1, constrained(temperature=1.0, seed=4)),
            Job("b", Q3, sampled(30, seed=5))]
    expected = alone(tiny, jobs)
    for ids in expected[1:3]:
        assert json.loads(engine.tokenizer.decode(ids, skip_special_tokens=True)).keys() == {"colour", "n"}
    assert ids_of(lined_up(tiny, jobs)) == expected
    assert ids_of(together(tiny, jobs)) == expected
    no_question_in_flight(tiny)


def test_a_full_batch_admits_a_waiting_answer_when_a_slot_frees(tiny):
    engine = tiny.engine
    jobs = [Job("a", Q1, greedy(20)), Job("b", Q2, greedy(20)), Job("c", Q3, greedy(20))]
    expected = alone(tiny, jobs)
    shared = engine._batcher
    engine._batcher = small = DecodeBatcher(engine.model, max_batch=2)
    cancel = threading.Event()
    try:
        small.hold()
        runners = [Runner(job.ask(tiny, cancel if i == 0 else None)).start() for i, job in enumerate(jobs)]
        for r in runners:
            assert r.first.wait(WAIT_S)
        small.allow(2)
        assert small.max_batch_seen == 2 and small.in_flight == 3  # the third waits for a slot
        cancel.set()
        small.allow(1)  # the first leaves, the third joins at this step
        assert small.batch_sizes == {2: 3}
        small.release()
        assert runners[0].result().token_ids == expected[0][:3]
        assert [r.result().token_ids for r in runners[1:]] == expected[1:]
        assert small.max_batch_seen == 2
    finally:
        small.release()
        engine._batcher = shared
    no_question_in_flight(tiny)


def test_a_reader_that_goes_away_frees_its_slot_and_its_cache(tiny):
    batcher = tiny.engine.batcher
    expected = alone(tiny, [Job("a", Q1, greedy(30))])[0]
    batcher.hold()
    try:
        stream = Job("a", Q1, greedy(30)).ask(tiny)
        it = iter(stream)
        assert next(it).token_id == expected[0]
        assert batcher.in_flight == 1
        it.close()  # the reader leaves without cancelling
        batcher.allow(1)
        assert batcher.in_flight == 0
    finally:
        batcher.release()
    no_question_in_flight(tiny)


def test_busy_prefix_caches_are_not_evicted_and_the_thread_ends_when_idle(tiny_videos):
    """With room for one prefix cache, a question over another frame set while the whole video's cache is in use
    evicts nothing in use; the decode thread ends once idle and starts again for the next answer."""
    engine, videos = tiny_videos
    sess = VideoSession.from_states(engine, *videos["c"], max_prefix_caches=1)
    whole, part = sess.frames_for()[0], range(4, 17)
    want = [sess.ask(Q1, policy="all", sampling=greedy(12)()).result().token_ids,
            sess.ask(Q2, start=4, end=16, policy="all", sampling=greedy(12)()).result().token_ids]
    assert sess.cached_frame_sets == [part]
    batcher = engine.batcher
    batcher.hold()
    try:
        a = Runner(sess.ask(Q1, policy="all", sampling=greedy(12)())).start()
        assert a.first.wait(WAIT_S)
        assert sess._prefixes[whole].busy
        b = Runner(sess.ask(Q2, start=4, end=16, policy="all", sampling=greedy(12)())).start()
        assert b.first.wait(WAIT_S)
        assert sess.cached_frame_sets == [whole, part] and all(e.busy for e in sess._prefixes.values())
    finally:
        batcher.release()
    assert [a.result().token_ids, b.result().token_ids] == want
    assert not any(e.busy for e in sess._prefixes.values())
    sess.ask(Q3, start=0, end=3, policy="all", sampling=greedy(2)()).result()
    assert len(sess.cached_frame_sets) == 1  # trimmed once free
    small = DecodeBatcher(engine.model, idle_s=0.05)
    shared, engine._batcher = engine._batcher, small
    try:
        for _ in range(2):
            assert sess.ask(Q1, policy="all", sampling=greedy(12)()).result().token_ids == want[0]
            for _ in range(400):
                if not small.running:
                    break
                threading.Event().wait(0.01)
            assert not small.running
    finally:
        engine._batcher = shared


def test_a_live_source_grows_while_a_question_decodes_in_its_prefix_cache(tiny_videos):
    """Incremental mode extends the whole-video prefix cache in place; while a question decodes in it, the new
    frames go into a copy, and the question in flight is unchanged."""
    engine, videos = tiny_videos
    states, ts = videos["b"]

    def live() -> VideoSession:
        return VideoSession.from_states(engine, states.select(slice(0, 30)), ts[:30], live_mode="incremental")

    quiet = live()
    before = quiet.ask(Q1, policy="all", sampling=greedy(20)()).result().token_ids
    quiet.append(states.select(slice(30, 45)), ts[30:])
    after = quiet.ask(Q2, policy="all", sampling=greedy(20)()).result().token_ids
    busy = live()
    busy.ask(Q3, policy="all", sampling=greedy(1)()).result()  # builds the 30-frame prefix cache
    batcher = engine.batcher
    batcher.hold()
    try:
        running = Runner(busy.ask(Q1, policy="all", sampling=greedy(20)())).start()
        assert running.first.wait(WAIT_S)
        batcher.allow(5)
        entry = busy._prefixes[range(30)]
        assert entry.busy
        busy.append(states.select(slice(30, 45)), ts[30:])
        grown = busy._prefixes[range(45)]
        assert grown.cache is not entry.cache and not grown.exact
    finally:
        batcher.release()
    assert running.result().token_ids == before
    assert busy.ask(Q2, policy="all", sampling=greedy(20)()).result().token_ids == after
    assert not entry.busy and entry.cache.length == entry.length


def test_the_process_exits_cleanly_while_an_answer_decodes(tmp_path, tiny_ckpt):
    """An answer nobody reads any more, decoding in the daemon thread when the interpreter exits: the thread is
    stopped at exit (a daemon thread inside torch during finalization would abort the process)."""
    script = f"""
import numpy as np
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.generate import SamplingConfig
from vidmini.engine.inference import Engine
from vidmini.engine.load import SHIPPED_MODEL_DIR
from vidmini.engine.session import VideoSession
loaded = load_checkpoint({str(tiny_ckpt)!r})
engine = Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids)
frames = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 3), dtype=np.uint8)
session = VideoSession.from_states(engine, engine.encode_frames(engine.frame_pixels(frames)), list(range(8)))
print(len(session.ask("hi", sampling=SamplingConfig(max_new_tokens=5, stop_ids=())).result().token_ids))
endless = iter(session.ask("hi", sampling=SamplingConfig(max_new_tokens=10**6, stop_ids=())))
next(endless)
assert engine.batcher.running and engine.batcher.in_flight == 1
print("bye")
"""
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["5", "bye"] and "terminate" not in done.stderr


# ---- the shipped demo model over stored videos -----------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two 20 s synthetic-world videos ingested into stores, opened through a session manager as the library
    opens them, and the demo model's questions about each (with their ranges)."""
    if not (SHIPPED_MODEL_DIR / "config.json").exists():
        pytest.skip("no shipped demo model")
    from fixtures.app_helpers import world_video

    from vidmini.demo.questions import make_questions
    from vidmini.engine.load import choose_model, open_engine
    from vidmini.ingest.job import run_ingest
    from vidmini.store.session import open_store_session
    from vidmini.store.video_store import StoreCatalog

    engine = open_engine(choose_model(str(SHIPPED_MODEL_DIR)))
    home = tmp_path_factory.mktemp("batcher_demo_home")
    manager = SessionManager(engine, device_budget_bytes=1 << 30)
    questions = {}
    for key, seed in (("v3", 3), ("v4", 4)):
        path, timeline = world_video(tmp_path_factory.mktemp(f"src{seed}"), seed=seed, seconds=20)
        store = StoreCatalog(home).get(run_ingest(str(path), engine, home).video_id)
        manager.open(key, lambda store=store, **kw: open_store_session(engine, store, **kw))
        questions[key] = make_questions(timeline, np.random.default_rng(seed), per_family=2)
    return manager, questions


def demo_jobs(manager: SessionManager, questions: dict) -> list[Job]:
    eos = manager.engine.eos_ids
    jobs = []
    for key, qs in questions.items():
        for i, q in enumerate(qs[:6]):
            ranged = i % 3 != 2  # most over their own range, some over the whole video
            length = greedy(4, stop=eos) if i % 2 == 0 else greedy(9 + 3 * i)  # the answer, or past its end
            jobs.append(Job(key, q.question, length, *((q.start_s, q.end_s) if ranged else (None, None))))
        jobs.append(Job(key, qs[0].question, sampled(12, seed=len(jobs))))
        jobs.append(Job(key, qs[1].question, greedy(4, stop=eos)))  # the same question twice on one video
    return jobs


def test_demo_model_concurrent_answers_equal_asking_alone(demo):
    manager, questions = demo
    jobs = demo_jobs(manager, questions)
    expected = alone(manager, jobs)
    texts = [manager.engine.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected]
    assert sum(bool(t) for t in texts) >= len(jobs) - 2 and len({tuple(e) for e in expected}) >= len(jobs) // 2
    batcher = manager.engine.batcher
    batcher.reset_stats()
    assert ids_of(lined_up(manager, jobs)) == expected
    # every answer with a first token goes on to a step (if only to meet its stop token): one batch of them all
    assert batcher.max_batch_seen == sum(len(e) > 0 for e in expected) >= 14 and batcher.batched_steps > 0
    no_question_in_flight(manager)
    for _ in range(2):
        assert ids_of(together(manager, jobs)) == expected
        no_question_in_flight(manager)


def test_demo_model_cancel_join_and_grammar_beside_plain_answers(demo):
    manager, questions = demo
    engine = manager.engine
    qs = questions["v3"]
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
              "required": ["answer"], "additionalProperties": False}

    def constrained() -> SamplingConfig:
        return SamplingConfig(max_new_tokens=40, stop_ids=engine.eos_ids,
                              grammar=JsonConstraint(engine.tokenizer, schema, engine.eos_ids))

    jobs = [Job("v3", qs[0].question, greedy(30)), Job("v3", qs[1].question, constrained),
            Job("v4", questions["v4"][0].question, greedy(30)), Job("v3", qs[2].question, greedy(30))]
    late = Job("v4", questions["v4"][1].question, greedy(20), questions["v4"][1].start_s, questions["v4"][1].end_s)
    expected = alone(manager, [*jobs, late])
    assert json.loads(engine.tokenizer.decode(expected[1], skip_special_tokens=True)).keys() == {"answer"}
    batcher = engine.batcher
    cancel = threading.Event()
    batcher.hold()
    try:
        runners = [Runner(job.ask(manager, cancel if i == 3 else None)).start() for i, job in enumerate(jobs)]
        for r in runners:
            assert r.first.wait(WAIT_S)
        batcher.allow(2)
        cancel.set()
        joiner = Runner(late.ask(manager)).start()
        assert joiner.first.wait(WAIT_S)
        batcher.allow(1)
        assert batcher.in_flight == 4  # the cancelled one left, the late one joined
    finally:
        batcher.release()
    assert runners[3].result().token_ids == expected[3][:3] and runners[3].result().cancelled
    assert ids_of([*runners[:3], joiner]) == [*expected[:3], expected[4]]
    no_question_in_flight(manager)


class ThreadsSeen:
    """A grammar allowing every token that records, on each call, how many intra-op threads the calling thread
    has: `mask` runs on the decode thread for every token after the first."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.done = False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        self.threads.append(torch.get_num_threads())
        return logits

    def advance(self, token: int) -> None:
        pass


def test_decode_steps_use_their_own_thread_count_and_never_run_beside_a_prefill(tiny):
    """A small CPU model decodes with one intra-op thread (the asking thread keeps its own count), and no step
    runs while a question holds `compute` for its fusion and prefill."""
    model = tiny.engine.model
    assert default_step_threads(model) == 1
    batcher = DecodeBatcher(model, step_threads=1)
    asking_threads = torch.get_num_threads()
    seen = ThreadsSeen()
    cache = allocate_cache(model, 16)
    prefill(model, model.embed(torch.tensor([[1, 2, 3]])), cache)
    seq = DecodeSequence(cache, SamplingConfig(max_new_tokens=6, grammar=seen))
    with batcher.compute:  # as a question's prefill holds it
        batcher.hold()
        batcher.start(seq, torch.zeros(model.config.llama.vocab_size))
        with pytest.raises(TimeoutError):
            batcher.allow(1, timeout=1.0)
        assert batcher.steps == 0
    batcher.release()
    assert len(list(seq.events())) == 6  # the first chosen on this thread, 5 more after a step each
    assert batcher.steps == 5
    assert seen.threads[0] == asking_threads and set(seen.threads[1:]) == {1}
    assert torch.get_num_threads() == asking_threads
    with pytest.raises(ValueError, match="step_threads"):
        DecodeBatcher(model, step_threads=0)
    batcher.close()


def test_choosing_for_a_batch_gives_what_each_answer_chooses_alone(tiny_videos):
    """`generate.choose_events` (the batched choice the decode thread makes) against `DecodeState.next_event`
    row by row, over many steps of random logits: greedy, greedy held to a JSON schema, seeded top-p sampling,
    log-probs of several sizes, a stop id, a cancelled answer and one whose grammar fails, side by side."""
    from vidmini.engine.generate import DecodeState, choose_events

    engine = tiny_videos[0]
    tok, stops = engine.tokenizer, engine.eos_ids
    vocab = engine.model.lm_head.out_features
    stop = next(iter(stops)) if stops else 0

    class Refusing:  # a grammar that breaks on its third token
        done = False

        def __init__(self) -> None:
            self.n = 0

        def allowed(self, v: int) -> torch.Tensor:
            return torch.ones(v, dtype=torch.bool)

        def mask(self, logits: torch.Tensor) -> torch.Tensor:
            return logits

        def advance(self, token: int) -> None:
            self.n += 1
            if self.n == 3:
                raise RuntimeError("refused")

    def configs() -> list[SamplingConfig]:
        return [SamplingConfig(max_new_tokens=40),
                SamplingConfig(max_new_tokens=40, logprobs=3),
                SamplingConfig(max_new_tokens=40, grammar=JsonConstraint(tok, SCHEMA, stops), stop_ids=tuple(stops)),
                SamplingConfig(max_new_tokens=40, logprobs=5, grammar=JsonConstraint(tok, SCHEMA, stops),
                               stop_ids=tuple(stops)),
                SamplingConfig(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=11, logprobs=2),
                SamplingConfig(max_new_tokens=40, temperature=1.2, seed=5),
                SamplingConfig(max_new_tokens=7),
                SamplingConfig(max_new_tokens=40, grammar=Refusing()),
                SamplingConfig(max_new_tokens=40, stop_ids=(stop,))]

    cancel = threading.Event()
    batched = [DecodeState(c, cancel if i == 1 else None) for i, c in enumerate(configs())]
    alone = [DecodeState(c) for c in configs()]
    gen = torch.Generator().manual_seed(0)
    seen_errors = 0
    for step in range(40):
        logits = torch.randn(len(batched), vocab, generator=gen) * 3
        if step == 5:
            logits[-1, stop] = 100.0  # the stop id wins: that answer ends
        if step == 9:
            cancel.set()
        got = choose_events(batched, logits)
        for b, (state, event) in enumerate(zip(alone, got, strict=True)):
            if b == 1 and step >= 9:
                state.finished = True  # cancelled with the batch
            try:
                want = state.next_event(logits[b])
            except RuntimeError as e:
                assert isinstance(event, RuntimeError) and str(event) == str(e)
                seen_errors += 1
                state.finished = batched[b].finished = True
                continue
            if want is None:
                assert event is None
                continue
            assert event is not None and not isinstance(event, BaseException)
            assert event.token_id == want.token_id
            assert event.logprob == pytest.approx(want.logprob, abs=1e-6)
            assert [i for i, _ in event.top] == [i for i, _ in want.top]
            assert [v for _, v in event.top] == pytest.approx([v for _, v in want.top], abs=1e-6)
            assert batched[b].finished == state.finished
    assert seen_errors == 1
    assert [s.step for s in batched] == [s.step for s in alone]
    assert alone[6].step == 7 and alone[8].step == 5 and alone[1].step == 9  # max tokens, stop id, cancelled
    assert all(s.step > 5 for s in (alone[2], alone[3]))  # JSON answers ran past the first tokens


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_pooled_step_equals_the_per_answer_step_and_writes_back_the_same_caches(tiny_videos, impl):
    """`decode_step_pooled` over a `DecodePool` of caches of different lengths against `decode_step` over the
    caches themselves, for several steps (the pool growing past its room): the same logits (to float rounding),
    and after `write_back` each cache holds what the per-answer steps wrote, at the same length."""
    from vidmini.engine.generate import decode_step_pooled
    from vidmini.engine.llama import DecodePool

    engine = tiny_videos[0]
    model = engine.model
    model.attn_impl = impl
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 40, 17, 1]
    caches = []
    for n in lengths:
        cache = allocate_cache(model, n + 2)
        cache.keys.copy_(torch.randn(cache.keys.shape, generator=gen))
        cache.values.copy_(torch.randn(cache.values.shape, generator=gen))
        cache.length = n
        caches.append(cache)
    twins = []
    for c in caches:
        twin = allocate_cache(model, c.capacity)
        twin.keys.copy_(c.keys)
        twin.values.copy_(c.values)
        twin.length = c.length
        twins.append(twin)
    pool = DecodePool.gather(caches, room=2)
    with torch.no_grad():
        for step in range(6):
            tokens = [(7 * step + b) % model.lm_head.out_features for b in range(len(caches))]
            pooled = decode_step_pooled(model, tokens, pool)
            alone = decode_step(model, tokens, twins)
            torch.testing.assert_close(pooled, alone, rtol=1e-4, atol=1e-4)
    assert [c.length for c in caches] == lengths  # untouched while pooled
    pool.write_back([0, 1, 3])  # row 2 "ended": its cache is not written
    for b in (0, 1, 3):
        n = lengths[b] + 6
        assert caches[b].length == twins[b].length == n
        torch.testing.assert_close(caches[b].keys[:, :, :, :n], twins[b].keys[:, :, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[b].values[:, :, :, :n], twins[b].values[:, :, :, :n], rtol=1e-5, atol=1e-5)
    assert caches[2].length == lengths[2]
    model.attn_impl = "sdpa"


def test_answers_decoded_per_answer_without_a_pool_equal_the_pooled_ones(tiny):
    """The batcher with `pool_bytes=0` (attention per answer over its own cache, as for a batch too large to
    copy) gives the same greedy answers as with the pool, both equal to the answers asked alone."""
    engine = tiny.engine
    jobs = tiny_greedy_jobs(engine)[:4]
    alone = [job.ask(tiny).result().token_ids for job in jobs]
    results = {}
    for budget in (0, 64 << 20):
        engine.batcher.pool_bytes = budget
        engine.batcher.reset_stats()
        runners = [Runner(job.ask(tiny)).start() for job in jobs]
        for r in runners:
            assert r.done.wait(WAIT_S) and r.error is None, r.error
        results[budget] = [r.ids for r in runners]
        assert engine.batcher.batched_steps > 0
    engine.batcher.pool_bytes = 64 << 20
    assert results[0] == results[64 << 20] == alone
