"""Real-time factor of the speech pipeline on this machine: decoding, voice activity, and each ASR backend, over
about 10 minutes of espeak-ng speech (lecture-like: runs of sentences, pauses between them) in an AAC file.

  python -m research.bench.asr                       # PocketSphinx; Whisper if one is in the local HF cache
  python -m research.bench.asr --whisper openai/whisper-small --device cuda
  python -m research.bench.asr --ingest              # also: `vidmini ingest` of a 720p lecture video, with and
                                                     # without its audio (the issue's bound: audio adds <= 30 %)
  python -m research.bench.asr --asr-workers 1 2     # also: the whole transcription (decode, VAD, PocketSphinx,
                                                     # commits) with 1 and with 2 worker processes

RTF = processing seconds / audio seconds (below 1: faster than real time), wall clock and, since the 2-core
machine is shared, this process's CPU seconds too (the load average is printed before and after). "keywords" counts the script's
keywords recognized within 1 s of when they were spoken. Whisper runs only from a local folder or the Hugging
Face cache (nothing is downloaded); without one it is reported as skipped. Prints a Markdown table last.

With --asr-workers, `speech.ingest.run_transcription` transcribes the same file into a fresh transcript store
once per worker count (1: in this process, as before; N > 1: a `RecognizerPool` of N spawned workers, their
start-up included): wall RTF, and CPU RTF counting this process and its workers, and whether every count made
the same transcript files (it must: windows are committed in order).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch

from vidmini.speech.audio import audio_windows, probe_audio
from vidmini.speech.backends import make_backend
from vidmini.speech.types import AudioWindow
from vidmini.speech.vad import load_model, speech_spans

VOICE, SPEED, RATE = "en-us+f2", 140, 22_050
KEYWORDS = ["computer", "hospital", "restaurant", "chocolate", "yesterday", "tomorrow", "president",
            "university", "music", "government"]
LEADS = ["i saw the", "she went to the", "we talked about the", "they found the", "he wrote about the"]
TAILS = ["today", "again", "last week", "in the morning", "with my friend"]
FILLERS = ["this is an important point", "let us look at the next example", "the results are very clear",
           "please remember this for the exam", "now we can continue with the lecture"]


def speak(text: str) -> np.ndarray:
    out = subprocess.run(["espeak-ng", "-v", VOICE, "-s", str(SPEED), "--stdout", text], capture_output=True,
                         check=True, timeout=60).stdout
    with wave.open(io.BytesIO(out)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    loud = np.flatnonzero(np.abs(x) > 0.01)
    return x[loud[0] : loud[-1] + 1] if len(loud) else x[:0]


def lecture(seconds: float, seed: int = 0) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """Paragraphs of 3-5 sentences (0.3 s apart, 1.5 s between paragraphs) until `seconds`; one keyword per
    paragraph, synthesized apart so its start is known. Returns the track (RATE) and (keyword, start) truth."""
    rng = np.random.default_rng(seed)
    cache: dict[str, np.ndarray] = {}

    def say(text):
        if text not in cache:
            cache[text] = speak(text)
        return cache[text]

    parts, truth, t = [], [], 1.0
    parts.append(np.zeros(int(t * RATE), np.float32))
    k = 0
    while t < seconds - 20:
        n = int(rng.integers(3, 6))
        at = int(rng.integers(0, n))
        for i in range(n):
            if i == at:
                keyword = KEYWORDS[k % len(KEYWORDS)]
                k += 1
                lead, kw = say(str(rng.choice(LEADS))), say(keyword)
                tail = say(str(rng.choice(TAILS)))
                gap = np.zeros(int(0.08 * RATE), np.float32)
                truth.append((keyword, t + (len(lead) + len(gap)) / RATE))
                sentence = np.concatenate([lead, gap, kw, gap, tail])
            else:
                sentence = say(str(rng.choice(FILLERS)))
            pause = np.zeros(int((0.3 if i < n - 1 else 1.5) * RATE), np.float32)
            parts += [0.8 * sentence, pause]
            t += (len(sentence) + len(pause)) / RATE
    parts.append(np.zeros(int(max(0.0, seconds - t) * RATE), np.float32))
    return np.concatenate(parts), truth


def write_m4a(track: np.ndarray, out: Path) -> Path:
    wav = out.with_suffix(".wav")
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((np.clip(track, -1, 1) * 32767).astype(np.int16).tobytes())
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(wav), "-c:a", "aac", "-ar",
                    "48000", "-ac", "2", "-b:a", "96k", str(out)], check=True, timeout=600)
    wav.unlink()
    return out


def cached_whisper() -> str | None:
    """A Whisper model in the local Hugging Face cache (the smallest by size on disk), or None."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = [r for r in scan_cache_dir().repos if r.repo_type == "model" and "whisper" in r.repo_id.lower()]
    except Exception:  # noqa: BLE001 - no cache, or one huggingface_hub cannot read
        return None
    return min(repos, key=lambda r: r.size_on_disk).repo_id if repos else None


class Clock:
    """Wall and CPU seconds (this process, all threads) of a `with` block."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0


def run_backend(backend, spans: list[AudioWindow], truth: list[tuple[str, float]]) -> tuple[Clock, int]:
    words = []
    with Clock() as clock:
        for span in spans:
            words += [w for s in backend.transcribe(span, "en") for w in s.words]
    heard = sum(any(w.text.strip(" .,!?").lower() == k and abs(w.start - at) <= 1.0 for w in words)
                for k, at in truth)
    return clock, heard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--whisper", default=None, help="folder or HF id in the local cache (default: any cached)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--window", type=float, default=30.0, help="audio window (s), as the ingest cuts them")
    ap.add_argument("--ingest", action="store_true",
                    help="also time `vidmini ingest` of a lecture video (this speech, 720p 30 fps pictures) with "
                         "--asr none and with PocketSphinx")
    ap.add_argument("--asr-only", action=argparse.BooleanOptionalAction, default=True,
                    help="the per-stage real-time factors (--no-asr-only with --ingest: only the ingest table)")
    ap.add_argument("--asr-workers", type=int, nargs="+", default=[], metavar="N",
                    help="also time the whole PocketSphinx transcription with each of these worker counts")
    args = ap.parse_args()
    if any(n < 1 for n in args.asr_workers):
        raise SystemExit("--asr-workers: each count must be >= 1")
    if shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None:
        raise SystemExit("needs espeak-ng and ffmpeg on PATH (make sysdeps)")
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        track, truth = lecture(args.minutes * 60)
        path = write_m4a(track, Path(tmp) / "lecture.m4a")
        if args.ingest:
            ingest_rows = ingest_with_and_without_audio(path, args.minutes * 60, Path(tmp))
            print_ingest(ingest_rows)
            if not args.asr_only:
                return
        info = probe_audio(path)
        print(f"made {len(track) / RATE:.0f} s of speech ({len(truth)} keywords) in {time.perf_counter() - t0:.1f} s: "
              f"{info.codec} {info.sample_rate} Hz x{info.channels}")

        with Clock() as decode:
            windows = list(audio_windows(path, window_s=args.window))
        audio_s = sum(w.end - w.start for w in windows)

        load_model()
        speech_spans(windows[0])  # TorchScript optimizes the model on its first calls: once per process
        with Clock() as vad:
            spans = [s for w in windows for s in speech_spans(w)]
        speech_s = sum(s.end - s.start for s in spans)
        print(f"decode+resample {decode.wall:.2f} s (CPU {decode.cpu:.2f} s), VAD {vad.wall:.2f} s "
              f"(CPU {vad.cpu:.2f} s): {len(spans)} spans, {speech_s:.0f} s of speech")

        rows = []
        backends = [("pocketsphinx", None)]
        model = args.whisper or cached_whisper()
        if model is not None:
            backends.append(("whisper", model))
        for kind, name in backends:
            t0 = time.perf_counter()
            try:
                backend = make_backend(kind, model=name, device=args.device)
            except ValueError as e:
                print(f"{kind}: skipped ({e})")
                continue
            t_load = time.perf_counter() - t0
            asr, heard = run_backend(backend, spans, truth)
            rows.append((backend.name, args.device if kind == "whisper" else "cpu", t_load, asr, heard))
            print(f"{backend.name}: load {t_load:.1f} s, ASR {asr.wall:.1f} s (CPU {asr.cpu:.1f} s), "
                  f"keywords {heard}/{len(truth)}")
        if model is None:
            print("whisper: skipped (no Whisper model in the local Hugging Face cache; pass --whisper PATH)")
        worker_rows = [transcribe_with_workers(path, n, args.window, Path(tmp), truth) for n in args.asr_workers]

    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    print()
    print(f"audio {audio_s:.0f} s (speech {speech_s:.0f} s); RTF wall / CPU: decode+resample "
          f"{decode.wall / audio_s:.4f} / {decode.cpu / audio_s:.4f}, VAD {vad.wall / audio_s:.4f} / "
          f"{vad.cpu / audio_s:.4f}")
    print()
    print("| backend | device | load (s) | ASR (s) | ASR RTF wall | ASR RTF CPU | total RTF wall (decode+VAD+ASR) "
          "| keywords heard |")
    print("|---|---|---|---|---|---|---|---|")
    for name, device, t_load, asr, heard in rows:
        total = (decode.wall + vad.wall + asr.wall) / audio_s
        print(f"| {name} | {device} | {t_load:.1f} | {asr.wall:.1f} | {asr.wall / audio_s:.3f} | "
              f"{asr.cpu / audio_s:.3f} | {total:.3f} | {heard}/{len(truth)} |")
    if worker_rows:
        print_workers(worker_rows, audio_s, len(truth))


class TreeClock:
    """Wall seconds of a `with` block and the CPU seconds of this process and of the children it waited for in
    it (a pool's workers are joined when it closes)."""

    @staticmethod
    def _cpu() -> float:
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, self._cpu() - self.c0


def transcribe_with_workers(path: Path, workers: int, window_s: float, tmp: Path, truth: list[tuple[str, float]]
                            ) -> tuple[int, TreeClock, int, str]:
    """`run_transcription` of `path` with PocketSphinx on `workers` processes (1: this one), into a fresh store:
    (workers, its clock, keywords heard, a digest of the transcript's files)."""
    import hashlib

    from vidmini.speech.ingest import run_transcription
    from vidmini.speech.parallel import BackendSpec, RecognizerPool
    from vidmini.speech.store import TranscriptStore

    spec = BackendSpec("pocketsphinx")  # as the ingest runs it: no language asked for
    threads = torch.get_num_threads()
    with TreeClock() as clock:
        if workers == 1:  # as the transcription child runs it: torch (the VAD) on one thread
            torch.set_num_threads(1)
            try:
                backend = spec.make()
                store = TranscriptStore.open(tmp / f"workers-{workers}", "bench000000000001", backend.name, None,
                                             window_s, source=str(path))
                result = run_transcription(str(path), store, backend)
            finally:
                torch.set_num_threads(threads)
        else:
            with RecognizerPool(spec, workers) as pool:
                store = TranscriptStore.open(tmp / f"workers-{workers}", "bench000000000001", pool.name, None,
                                             window_s, source=str(path))
                result = run_transcription(str(path), store, pool)
    assert result.state == "complete", result
    words = [w for seg in store.segments() for w in seg.words]
    heard = sum(any(w.text.strip(" .,!?").lower() == k and abs(w.start - at) <= 1.0 for w in words)
                for k, at in truth)
    digest = hashlib.sha256()
    for f in sorted(p for p in store.path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(store.path)).encode() + b"\0" + f.read_bytes())
    print(f"pocketsphinx, {workers} worker(s): {clock.wall:.1f} s wall, CPU {clock.cpu:.1f} s, "
          f"{result.segments} segments, keywords {heard}/{len(truth)}", flush=True)
    return workers, clock, heard, digest.hexdigest()[:12]


def print_workers(rows: list[tuple[int, TreeClock, int, str]], audio_s: float, keywords: int) -> None:
    base = rows[0][1].wall
    print()
    print(f"| whole transcription (PocketSphinx, {audio_s:.0f} s of audio) | wall (s) | RTF wall | RTF CPU "
          f"| speed-up | keywords heard | transcript |")
    print("|---|---|---|---|---|---|---|")
    for workers, clock, heard, digest in rows:
        same = "same" if digest == rows[0][3] else "DIFFERENT"
        print(f"| {workers} worker{'s' if workers > 1 else ''} | {clock.wall:.1f} | {clock.wall / audio_s:.3f} | "
              f"{clock.cpu / audio_s:.3f} | {base / clock.wall:.2f}x | {heard}/{keywords} | {digest} ({same}) |")


def lecture_video(audio: Path, seconds: float, out: Path) -> Path:
    """A lecture-like video: synthetic-world pictures (a scene every few seconds) scaled to 1280x720 at 30 fps,
    H.264, with `audio` as its sound track: the frame path decodes what a real 720p lecture makes it decode."""
    from vidmini.demo.render import write_video
    from vidmini.demo.world import generate_timeline

    pictures = write_video(generate_timeline(3, int(seconds)), out.with_name("pictures.mp4"))
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(pictures), "-i", str(audio),
                    "-map", "0:v", "-map", "1:a", "-vf", "scale=1280:720,fps=30", "-c:v", "libx264", "-preset",
                    "veryfast", "-g", "60", "-pix_fmt", "yuv420p", "-c:a", "copy", "-shortest", str(out)],
                   check=True, timeout=3600)
    return out


def ingest_with_and_without_audio(audio: Path, seconds: float, tmp: Path) -> list[tuple[str, float, dict]]:
    """`vidmini ingest --json` of the lecture video in a fresh data folder each, with --asr none and with
    PocketSphinx (the command returns once the transcript is complete): (asr, wall seconds, its JSON record)."""
    import json
    import sys

    video = lecture_video(audio, seconds, tmp / "lecture.mp4")
    rows = []
    for asr in ("none", "pocketsphinx"):
        env = {**os.environ, "VIDMINI_HOME": str(tmp / f"home-{asr}")}
        env.pop("VIDMINI_MODEL", None)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "vidmini.cli.main", "ingest", str(video), "--json", "--asr", asr],
                             env=env, capture_output=True, text=True, check=True, timeout=7200)
        rows.append((asr, time.perf_counter() - t0, json.loads(out.stdout.splitlines()[-1])))
    return rows


def print_ingest(rows: list[tuple[str, float, dict]]) -> None:
    base = next(wall for asr, wall, _ in rows if asr == "none")
    print()
    print("| `vidmini ingest` of the 720p lecture video | wall (s) | frames | transcript | vs frames only |")
    print("|---|---|---|---|---|")
    for asr, wall, record in rows:
        t = record.get("transcript") or {}
        said = f"{t.get('state')}, {t.get('segments', 0)} segments" if t else "-"
        print(f"| --asr {asr} | {wall:.1f} | {record['frames']} | {said} | {wall / base:.2f}x |")


if __name__ == "__main__":
    main()
