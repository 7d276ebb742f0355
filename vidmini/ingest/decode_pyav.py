"""PyAV backend: decode only what the sampling times need, and keep the pts and frame number of everything.

Strategy, chosen per file from the probe (`choose_plan`):
- sequential: every packet is demuxed, so frame numbers are exact and damage shows up where it happens.
- skip non-reference frames: a packet whose frame is displayed at no sampling time is decoded with
  `skip_frame=NONREF`; the decoder then drops it if nothing references it (B-frames). In exact mode a frame
  is skipped only when a look-ahead over the next packets proves it: no sampling time lies between its pts
  and the next pts. Fast mode assumes the next pts is pts + frame duration (exact for constant frame rates;
  on irregular ones it may return a frame up to about one frame older) and needs no look-ahead.
- seek: in a file whose index lists keyframes, once every frame up to a sampling time is decoded, if the next
  sampling time's keyframe lies more than SEEK_MIN_FRAMES ahead, `container.seek(t, backward=True,
  any_frame=False)` jumps to it and decoding goes forward from there: with sampling much sparser than keyframes
  (1 frame per 10 s over 1 s GOPs) that skips whole GOPs; with long GOPs it still skips the frames after a
  GOP's last sampling time. Used when the index lists every frame (MP4/MOV: frame numbers stay exact), when
  sampling is sparse (interval >= 2 keyframe intervals in exact mode, >= 1 in fast mode) or when start > 0.
  Exact in both modes: a seek that lands after its sampling time is retried one keyframe earlier, and frames
  before a keyframe's pts (open-GOP leading frames) are never the frame displayed at a later time.
Frame numbers after a seek come from the container index when it lists every frame (MP4/MOV), otherwise
they are estimated from the average rate (`stats.index_exact` becomes False).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from vidmini.ingest.decode_common import (
    Decoded,
    SampledFrame,
    SamplerStats,
    SampleSpec,
    deinterlace,
    display_size,
    every_k,
    hold,
    materialize,
    rotate,
)
from vidmini.ingest.errors import CorruptMedia, one_line
from vidmini.ingest.probe import ProbeInfo, check_decodable, open_container, pick_stream, source_name

log = logging.getLogger(__name__)
SEEK_MIN_FRAMES = 12
MAX_SEEK_RETRIES = 4  # seeks in a row landing after one sampling time before seeking is given up
# Frame threads: FFmpeg's auto choice is cores + 1; on the 2-core bench machine cores + 2 decoded ~20% faster
# (1080p and 360p H.264, skipping non-reference frames); cores + 3 was slower again.
DECODE_THREADS = min(16, len(os.sched_getaffinity(0)) + 2) if hasattr(os, "sched_getaffinity") else 0


@dataclass(frozen=True)
class Plan:
    name: str
    skip_nonref: bool
    lookahead: int  # packets held back to prove a frame is not needed (exact mode)
    seek: bool


def choose_plan(spec: SampleSpec, info: ProbeInfo | None, nominal: Fraction, reorder: int) -> Plan:
    """Pick the decode strategy from the sampling interval and the file's keyframe spacing."""
    if spec.every_k:
        return Plan("sequential, every frame", False, 0, False)
    step = spec.step
    skip = step > nominal  # sampling sparser than the frames: some frames are displayed at no sampling time
    lookahead = 0 if spec.mode == "fast" else max(8, 2 * reorder + 4)
    gop = info.keyframe_interval_s if info is not None else None
    ratio = 1.0 if spec.mode == "fast" else 2.0
    sparse = bool(gop) and float(step) >= ratio * gop
    # Seeking is exact either way; without a full index it costs exact frame numbers, so only when it pays most.
    seek = bool(info is not None and info.seekable and (sparse or spec.start > 0 or info.full_index))
    parts = ["seek to keyframes" if seek and sparse else
             "sequential, seeking past unneeded GOP tails" if seek else "sequential"]
    if skip:
        parts.append("skip non-reference frames" + (" (proved by look-ahead)" if lookahead else ""))
    return Plan(", ".join(parts), skip, lookahead, seek)


@dataclass
class _Ticks:
    """Sampling times in stream time-base ticks, with integer arithmetic (runs once per packet)."""

    origin: int
    num: int  # one sampling interval = num / den ticks
    den: int
    k0: int
    kend: int | None

    def covers(self, p: int, q: int) -> bool:
        """Is some sampling time in [p, q)?"""
        k = max(self.k0, -((-(p - self.origin) * self.den) // self.num))
        return (self.kend is None or k < self.kend) and k * self.num < (q - self.origin) * self.den

    def next_after(self, d: int) -> int | None:
        """The first k whose time is > d ticks, or None when no sampling time is left."""
        k = max(self.k0, (d - self.origin) * self.den // self.num + 1)
        return None if self.kend is not None and k >= self.kend else k

    def tick(self, k: int) -> int:
        return self.origin + k * self.num // self.den


class _Window:
    """The pts of the last n packets, sorted: the next pts after a frame, for the exact skip proof."""

    def __init__(self, n: int) -> None:
        self.n, self.order, self.sorted = n, deque(), []

    def add(self, x: int) -> None:
        self.order.append(x)
        bisect.insort(self.sorted, x)
        if len(self.order) > self.n:
            del self.sorted[bisect.bisect_left(self.sorted, self.order.popleft())]

    def next_after(self, x: int) -> int | None:
        i = bisect.bisect_right(self.sorted, x)
        return self.sorted[i] if i < len(self.sorted) else None

    def clear(self) -> None:
        self.order.clear()
        self.sorted.clear()


class _SeekGaveUp(Exception):
    """Seeks keep landing after the frame they were for."""


class _Decoder:
    """One pass over one stream: yields `Decoded` frames in presentation order, seeking when the plan says."""

    def __init__(self, container, vs, spec: SampleSpec, stats: SamplerStats, plan: Plan,
                 info: ProbeInfo | None) -> None:
        self.container, self.vs, self.cc = container, vs, vs.codec_context
        self.spec, self.stats, self.plan, self.info = spec, stats, plan, info
        self.name = source_name(spec.source)
        self.tb = vs.time_base or Fraction(1, 90000)
        rate = vs.average_rate or vs.guessed_rate
        self.rate = Fraction(rate) if rate else Fraction(25)
        self.nominal_ticks = max(1, round(1 / (self.rate * self.tb)))
        step_ticks = spec.step / self.tb
        self.step_num, self.step_den = step_ticks.numerator, step_ticks.denominator
        self.cfr = info is not None and not info.is_vfr and not info.is_live
        self.jump_ticks = max(4 * self.nominal_ticks, math.ceil(2 * step_ticks))
        self.margin_ticks = int(self.cc.has_b_frames or 0) * self.nominal_ticks  # keyframe pts - dts, at most
        # a seek (decoder drain, flush, refill) pays when it skips more than this many frames
        self.min_skip_ticks = max(SEEK_MIN_FRAMES * self.nominal_ticks, 2 * self.margin_ticks)
        self.reformatter = VideoReformatter()  # one per pass: its scaler is set up once, not per frame (3x)
        self.entries = vs.index_entries if plan.seek else None
        self.seeking = plan.seek
        self.ticks: _Ticks | None = None
        self.origin: int | None = None
        self.heap: list[int] = []
        self.passed: int | None = 0  # frames (presentation order) before the heap's smallest pts
        self.prev_popped: int | None = None
        self.last_t: Fraction | None = None
        self.damage = self.resync = self.after_seek = False
        self.pending: deque = deque()
        self.window = _Window(64 + plan.lookahead)
        self.skip_state: str | None = None
        self.checked_k: int | None = None
        self.seek_check: int | None = None  # the sampling time (ticks) the last seek must land before
        self.reseek: tuple[int, int] | None = None  # (seek to, sampling time): a seek to redo earlier
        self.seek_position = 0  # where the last seek asked to go
        self.seek_check_target: int | None = None  # the sampling time of the last seek, and how often in a row
        self.seek_retries = 0
        self.find_base = False  # the first packet after a seek gives the frame number from the index

    # -- packets -------------------------------------------------------------------------------------------
    def frames(self) -> Iterator[Decoded]:
        demux = self.container.demux(self.vs)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                break
            except av.FFmpegError as e:  # the demuxer gave up: a truncated or damaged tail
                self.stats.error(self.name, f"reading stopped: {one_line(e)}")
                self.damage = True
                break
            if packet.size == 0 and packet.pts is None and packet.dts is None:
                continue  # PyAV's end-of-stream packet: draining is done below
            if self.find_base:
                self._base_from_index(packet)
            if packet.pts is not None:
                heapq.heappush(self.heap, packet.pts)
                self.window.add(packet.pts)
            self.pending.append(packet)
            while len(self.pending) > self.plan.lookahead:
                p = self.pending.popleft()
                yield from self._feed(p)
                target = self.reseek or self._seek_choice(p)
                if target is not None:
                    yield from self._drain(flush=True)
                    self._seek(*target)
                    demux = self.container.demux(self.vs)
                    break
        while self.pending:
            yield from self._feed(self.pending.popleft())
        yield from self._drain(flush=False)

    def _wanted(self, packet) -> bool:
        """Is this packet's frame displayed at some sampling time? (True when it cannot be ruled out.)"""
        if self.ticks is None or packet.pts is None:
            return True
        p = packet.pts
        if self.plan.lookahead:
            q = self.window.next_after(p)
            if q is None:
                return True
        else:
            q = p + (packet.duration or self.nominal_ticks)
        return self.ticks.covers(p, q)

    def _feed(self, packet) -> Iterator[Decoded]:
        if self.plan.skip_nonref:
            mode = "DEFAULT" if self._wanted(packet) else "NONREF"
            if mode != self.skip_state:
                self.cc.skip_frame = mode
                self.skip_state = mode
        if packet.is_corrupt:
            self.stats.error(self.name, f"damaged packet at pts {packet.pts}")
            self.damage = self.resync = True
        try:
            frames = packet.decode()
        except av.FFmpegError as e:
            self.stats.error(self.name, f"skipped a packet that does not decode: {one_line(e)}")
            self.damage = self.resync = True
            return
        for frame in frames:
            yield from self._accept(frame)

    def _drain(self, flush: bool) -> Iterator[Decoded]:
        try:
            frames = self.cc.decode(None)
        except av.FFmpegError as e:
            self.stats.error(self.name, f"draining the decoder failed: {one_line(e)}")
            frames = []
        for frame in frames:
            yield from self._accept(frame)
        if flush:
            self.cc.flush_buffers()

    # -- frames --------------------------------------------------------------------------------------------
    def _accept(self, frame) -> Iterator[Decoded]:
        self.stats.frames_decoded += 1
        if self.reseek is not None:
            return  # a failed seek: everything until the retry is discarded
        if frame.is_corrupt:
            self.stats.error(self.name, f"dropped a frame the decoder concealed (pts {frame.pts})")
            self.damage = self.resync = True
            return
        if self.resync and self.origin is not None:
            if not frame.key_frame:
                return  # after damage, frames until the next keyframe are concealment guesses
            self.resync = False
        ts = frame.pts if frame.pts is not None else frame.dts
        if ts is None:  # no timestamp at all: right after the previous frame
            ts = (self.origin or 0) + (0 if self.last_t is None else round(self.last_t / self.tb) + self.nominal_ticks)
        if self.origin is None:
            self._set_origin(ts)
        if self.seek_check is not None:
            target, self.seek_check = self.seek_check, None
            if ts > target:  # landed after the sampling time: its frame is earlier, go back a keyframe
                log.debug("%s: seek landed at %s > %s, retrying one keyframe earlier", self.name, ts, target)
                self.reseek = (self._keyframe_before(self.seek_position, ts), target)
                return
        t = Fraction(ts - self.origin) * self.tb
        if self.last_t is not None and t <= self.last_t:
            return  # repeated or out of order (after damage or a seek): keep presentation order
        index = self._index(ts)
        duration = Fraction(frame.duration) * self.tb if frame.duration else None
        d = Decoded(t, index, duration, partial(self._rgb, frame), damaged=self.damage, after_seek=self.after_seek)
        self.damage = self.after_seek = False
        self.last_t = t
        yield d

    def _set_origin(self, ts: int) -> None:
        self.origin = ts
        self.ticks = _Ticks(ts, self.step_num, self.step_den, self.spec.first_k(), self.spec.end_k())

    def _index(self, ts: int) -> int:
        """Frames before this one in presentation order: packets demuxed with a smaller pts."""
        if self.passed is None:
            return round((ts - self.origin) * self.tb * self.rate)
        while self.heap and self.heap[0] < ts:
            x = heapq.heappop(self.heap)
            if self.cfr and self.prev_popped is not None and x - self.prev_popped > self.jump_ticks:
                self._jump(self.prev_popped, x)
            self.prev_popped = x
            self.passed += 1
        index = self.passed
        if self.heap and self.heap[0] == ts:
            heapq.heappop(self.heap)
            if self.cfr and self.prev_popped is not None and ts - self.prev_popped > self.jump_ticks:
                self._jump(self.prev_popped, ts)
            self.prev_popped = ts
            self.passed += 1
        return index

    def _jump(self, a: int, b: int) -> None:
        self.stats.error(self.name, f"timestamps jump from {float((a - self.origin) * self.tb):.3f} s to "
                                    f"{float((b - self.origin) * self.tb):.3f} s in a constant-rate stream: lost data")
        self.damage = True

    def _rgb(self, frame) -> np.ndarray:
        rotation = frame.rotation or 0
        spec = self.spec
        if spec.deinterlace and frame.interlaced_frame:
            rgb = deinterlace(frame.to_ndarray(format="rgb24"))
            if spec.size is not None:
                w, h = display_size(spec.size, rotation)
                rgb = self.reformatter.reformat(av.VideoFrame.from_ndarray(rgb, format="rgb24"), width=w, height=h,
                                                interpolation=spec.sws_interpolation).to_ndarray()
        elif spec.size is not None:
            w, h = display_size(spec.size, rotation)
            rgb = self.reformatter.reformat(frame, width=w, height=h, format="rgb24",
                                            interpolation=spec.sws_interpolation).to_ndarray()
        else:
            rgb = frame.to_ndarray(format="rgb24")
        return rotate(rgb, rotation) if rotation else rgb

    # -- seeking -------------------------------------------------------------------------------------------
    def _keyframe_at_or_before(self, i: int) -> int | None:
        while i >= 0 and not self.entries[i].is_keyframe:
            i -= 1
        return i if i >= 0 else None

    def _keyframe_before(self, position: int, landed: int) -> int:
        """A seek position one keyframe before where a seek to `position` went. Not `landed - 1`: a demuxer
        that seeks by dts puts a keyframe whose dts is below its pts right back at the same place (a B-frame
        stream whose keyframe shows one tick after the sampling time looped here forever)."""
        if self.entries:
            i = bisect.bisect_right(self.entries, position, key=lambda e: e.timestamp) - 1
            i = self._keyframe_at_or_before(min(i, len(self.entries) - 1))
            if i is not None:
                j = self._keyframe_at_or_before(i - 1)
                return self.entries[j].timestamp if j is not None else self.origin
        back = min(position, landed) - max(self.margin_ticks, self.nominal_ticks) * SEEK_MIN_FRAMES
        return max(back, self.origin or 0)

    def _seek_choice(self, packet) -> tuple[int, int] | None:
        """(seek position, sampling time) in ticks, when that time's keyframe is over a GOP ahead."""
        if not self.seeking or self.ticks is None or packet.dts is None:
            return None
        k = self.ticks.next_after(packet.dts)
        if k is None or k == self.checked_k:
            return None
        self.checked_k = k
        target = self.ticks.tick(k)
        if self.seek_check_target is not None and target <= self.seek_check_target:
            return None  # already sought for this time: the demuxer landed earlier than the index said (a
            # second seek would land there again, forever); decode forward from here instead
        i = bisect.bisect_right(self.entries, target - self.margin_ticks, key=lambda e: e.timestamp) - 1
        i = self._keyframe_at_or_before(i)
        if i is None or self.entries[i].timestamp - packet.dts <= self.min_skip_ticks:
            return None
        return target, target

    def _seek(self, position: int, target: int) -> None:
        """Seek to the last keyframe at or before `position` (demuxers that seek by dts may land later:
        the first frame is checked against `target`). A failed seek ends seeking: decoding goes on from the
        last keyframe before what was already delivered, and repeats are dropped by the pts order check."""
        self.reseek = None
        self.seek_retries = self.seek_retries + 1 if target == self.seek_check_target else 0
        self.seek_check_target = target
        try:
            if self.seek_retries > MAX_SEEK_RETRIES:  # the index misleads: decode sequentially from here on
                raise _SeekGaveUp(f"{MAX_SEEK_RETRIES + 1} seeks in a row landed after the sampling time")
            self.container.seek(position, stream=self.vs, backward=True, any_frame=False)
            self.seek_position = position
            self.seek_check = target
        except (av.FFmpegError, _SeekGaveUp) as e:
            log.warning("%s: seeking failed, decoding sequentially from here: %s", self.name, one_line(e))
            self.seeking = False
            back = self.origin + round((self.last_t or 0) / self.tb)
            try:
                self.container.seek(back, stream=self.vs, backward=True, any_frame=False)
            except av.FFmpegError as e2:
                raise CorruptMedia(f"{self.name}: cannot seek back after a failed seek ({one_line(e2)})") from None
        self.pending.clear()
        self.window.clear()
        self.heap.clear()
        self.prev_popped = None
        self.resync = False
        self.after_seek = True
        self.passed = None
        self.find_base = True

    def _base_from_index(self, packet) -> None:
        """Frame number after a seek: the keyframe's place in an index that lists every frame (decode order =
        presentation order at a keyframe that starts a closed GOP); else estimated from the rate."""
        self.find_base = False
        if self.info is not None and self.info.full_index and packet.pos is not None and packet.pos >= 0:
            i = bisect.bisect_left(self.entries, packet.pos, key=lambda e: e.pos)
            if i < len(self.entries) and self.entries[i].pos == packet.pos:
                self.passed = i
                return
        self.stats.index_exact = False

    def expected_end(self) -> Fraction | None:
        """Where the header says the video stream ends, from the origin (files only)."""
        vs = self.vs
        if self.info is None or self.info.is_live or not vs.duration or self.origin is None:
            return None
        return Fraction((vs.start_time or 0) + vs.duration - self.origin) * self.tb


def rate_and_reorder(vs) -> tuple[Fraction, int]:
    rate = vs.average_rate or vs.guessed_rate
    return (1 / Fraction(rate) if rate else Fraction(1, 25)), int(vs.codec_context.has_b_frames or 0)


def sample_pyav(spec: SampleSpec, stats: SamplerStats, info: ProbeInfo | None) -> Iterator[SampledFrame]:
    """The PyAV backend: `SampledFrame`s for `spec`, damage recorded in `stats`."""
    name = source_name(spec.source)
    container = open_container(spec.source, hwaccel=spec.hwaccel)
    with container:
        vs = pick_stream(container, spec.stream, name)
        check_decodable(vs, name)
        vs.thread_type = "AUTO"
        vs.codec_context.thread_count = DECODE_THREADS
        discard_all = getattr(getattr(av.stream, "Discard", None), "all", None)
        for other in container.streams:
            if other.index != vs.index and discard_all is not None:
                other.discard = discard_all  # the demuxer skips their packets instead of reading them
        nominal, reorder = rate_and_reorder(vs)
        plan = choose_plan(spec, info, nominal, reorder)
        stats.strategy = plan.name
        decoder = _Decoder(container, vs, spec, stats, plan, info)
        got = False
        if spec.every_k:
            for f in every_k(decoder.frames(), spec):
                got = True
                yield f
        else:
            events = hold(decoder.frames(), spec, stats, nominal, decoder.expected_end)
            for f in materialize(events, spec.step):
                got = True
                yield f
        if not got and decoder.origin is None:
            raise CorruptMedia(f"{name}: no decodable video frames ({stats.decode_errors} decode errors)")
