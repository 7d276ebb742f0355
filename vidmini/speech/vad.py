"""Voice activity: the stretches of an audio window that hold speech, by silero-vad.

silero-vad ships its model in the wheel (`silero_vad.jit`, run by torch; torchaudio is not needed: audio comes
from `speech.audio`). The model is loaded once per process, on first use. It carries recurrent state between
its 32 ms chunks, so one `speech_spans` call runs at a time (a lock), and every call starts from a reset state:
a window's spans never depend on the windows before it (which worker process saw which windows, or whether a
run was resumed, cannot change them). A call costs about 1 % of the audio's duration on the 2-core CPU, after
the first, which also pays TorchScript's one-time optimization (seconds).

Spans are padded a little (the recognizer hears the onset and the tail), spans closer than `merge_gap_s` are
joined (fewer, longer recognizer calls with context), and none is longer than `max_span_s`, so one ASR call
stays bounded (Whisper's input is at most 30 s).
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

from vidmini.speech.types import SAMPLE_RATE, AudioWindow

_model = None
_load_lock = threading.Lock()
_run_lock = threading.Lock()


def load_model():
    """The process's silero-vad model (torch JIT, CPU), loaded on first call."""
    global _model
    with _load_lock:
        if _model is None:
            threads = torch.get_num_threads()  # importing silero_vad sets torch to one thread for the process
            from silero_vad import load_silero_vad

            torch.set_num_threads(threads)
            with warnings.catch_warnings():  # its loader's importlib.resources.path and torch.jit.load deprecations
                warnings.simplefilter("ignore", DeprecationWarning)
                _model = load_silero_vad(onnx=False)
    return _model


def speech_times(samples: np.ndarray, threshold: float = 0.5, min_speech_s: float = 0.25,
                 min_silence_s: float = 0.3, max_span_s: float = 30.0) -> list[tuple[int, int]]:
    """silero-vad's speech stretches of 16 kHz mono `samples`, as (start, end) sample indices, unpadded."""
    if len(samples) == 0:
        return []
    from silero_vad import get_speech_timestamps

    model = load_model()
    audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    with _run_lock, torch.inference_mode():
        model.reset_states()  # silero's get_speech_timestamps resets it too; this window must not rely on that
        found = get_speech_timestamps(audio, model, threshold=threshold, sampling_rate=SAMPLE_RATE,
                                      min_speech_duration_ms=int(min_speech_s * 1000),
                                      min_silence_duration_ms=int(min_silence_s * 1000),
                                      max_speech_duration_s=max_span_s, speech_pad_ms=0)
    return [(int(s["start"]), int(s["end"])) for s in found]


def merge_spans(spans: list[tuple[int, int]], n: int, pad: int, merge_gap: int, max_len: int
                ) -> list[tuple[int, int]]:
    """Pad each (start, end) by `pad` samples within [0, n), join those `merge_gap` apart or closer while the
    result stays within `max_len`, and cut any longer span into pieces of at most `max_len`."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        s, e = max(0, s - pad), min(n, e + pad)
        if out and s - out[-1][1] <= merge_gap and e - out[-1][0] <= max_len:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif out and s < out[-1][1]:  # overlaps after padding but too long to join: start where it ends
            out.append((out[-1][1], e))
        else:
            out.append((s, e))
    pieces = []
    for s, e in out:
        while e - s > max_len:
            pieces.append((s, s + max_len))
            s += max_len
        if e > s:
            pieces.append((s, e))
    return pieces


def speech_spans(window: AudioWindow, threshold: float = 0.5, pad_s: float = 0.2, merge_gap_s: float = 0.6,
                 max_span_s: float = 30.0, min_speech_s: float = 0.25) -> list[AudioWindow]:
    """The sub-windows of `window` that hold speech, in order, on the same clock (see the module docstring).

    `threshold`: silero's speech probability cut; `pad_s` added each side; `merge_gap_s`: spans this close are
    joined; `max_span_s`: longest span returned; `min_speech_s`: shorter bursts are dropped."""
    if max_span_s <= 2 * pad_s:
        raise ValueError(f"max_span_s ({max_span_s}) must exceed twice pad_s ({pad_s})")
    samples = window.samples
    # silero splits speech longer than this at a pause; the padding is added after
    found = speech_times(samples, threshold, min_speech_s=min_speech_s, max_span_s=max_span_s - 2 * pad_s)
    spans = merge_spans(found, len(samples), round(pad_s * SAMPLE_RATE), round(merge_gap_s * SAMPLE_RATE),
                        round(max_span_s * SAMPLE_RATE))
    return [AudioWindow(window.start + s / SAMPLE_RATE, samples[s:e]) for s, e in spans]
