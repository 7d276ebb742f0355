"""Real speech for the speech tests: espeak-ng sentences placed at known times in an audio track, muxed by the
ffmpeg CLI beside a test-pattern video in the containers and codecs users bring.

Each sentence is "<lead-in> <keyword> <tail>", the three parts synthesized apart and joined with short pauses, so
the keyword's start and end in the track are known to the sample (its voiced part, silence trimmed). The truth
is given on the video's clock: where a variant shifts the audio against the video (a track starting 5 s late, a
video starting 2 s after its audio), the truth shifts with it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

VOICE = "en-us+f2"  # espeak-ng voice and speed that PocketSphinx's en-us model hears best (tried on 20 words)
SPEED = 130
TRACK_RATE = 22_050  # espeak-ng's own rate; ffmpeg resamples to each variant's rate
# (time the sentence starts in the audio track, lead-in, keyword, tail): keywords PocketSphinx's en-us model
# recognizes from this voice, apart in sound, so a recognized word is that keyword and no other.
SCRIPT: tuple[tuple[float, str, str, str], ...] = (
    (1.5, "i saw the", "computer", "today"),
    (9.0, "she went to the", "hospital", "again"),
    (16.5, "we ate at the", "restaurant", "tonight"),
)
KEYWORDS = tuple(keyword for _, _, keyword, _ in SCRIPT)
SILENT_FROM = 22.0  # no speech after this in the track: the VAD must find none there
TRACK_S = 26.0  # the audio track's length; the video lasts as long (variants shift one against the other)

# name: (container suffix, audio codec and options, audio shift against the video in seconds, video shift)
VARIANTS: dict[str, tuple[str, list[str], float, float]] = {
    "mp4_aac_16k_mono": (".mp4", ["-c:a", "aac", "-ar", "16000", "-ac", "1", "-b:a", "48k"], 0.0, 0.0),
    "mkv_opus": (".mkv", ["-c:a", "libopus", "-ar", "48000", "-ac", "1", "-b:a", "32k"], 0.0, 0.0),
    "mp4_aac_48k_stereo": (".mp4", ["-c:a", "aac", "-ar", "48000", "-ac", "2", "-b:a", "96k"], 0.0, 0.0),
    "mp4_audio_late_5s": (".mp4", ["-c:a", "aac", "-ar", "16000", "-ac", "1", "-b:a", "48k"], 5.0, 0.0),
    "mkv_video_late_2s": (".mkv", ["-c:a", "libopus", "-ar", "48000", "-ac", "1", "-b:a", "32k"], 0.0, 2.0),
    "ts_mp2": (".ts", ["-c:a", "mp2", "-ar", "48000", "-ac", "2", "-b:a", "128k"], 0.0, 0.0),
}


def have_tools() -> bool:
    """espeak-ng and the ffmpeg CLI (with libx264, aac, libopus, mp2) on PATH."""
    return shutil.which("espeak-ng") is not None and shutil.which("ffmpeg") is not None


@dataclass(frozen=True)
class Spoken:
    """A keyword as spoken: seconds on the video's clock."""

    word: str
    start: float
    end: float


@dataclass(frozen=True)
class SpeechVideo:
    path: Path
    words: tuple[Spoken, ...]  # the keywords, in order
    sentences: tuple[tuple[float, float], ...]  # each whole sentence's (start, end), video clock
    audio_start: float | None  # where the track's first sample lies on the video's clock; None: no audio
    audio_end: float | None
    duration_s: float  # of the video stream

    def silent_spans(self, margin: float = 0.5) -> list[tuple[float, float]]:
        """Stretches of the track (video clock) with no sentence within `margin` seconds."""
        if self.audio_start is None:
            return []
        edges = [self.audio_start, *[x for s, e in self.sentences for x in (s - margin, e + margin)],
                 self.audio_end]
        return [(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True) if b - a > 0.5]


def speak(text: str, voice: str = VOICE, speed: int = SPEED) -> np.ndarray:
    """espeak-ng's rendering of `text`: float32 mono at TRACK_RATE, leading and trailing silence trimmed."""
    out = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True,
                         check=True, timeout=60).stdout
    with wave.open(io.BytesIO(out)) as w:
        assert w.getframerate() == TRACK_RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    loud = np.flatnonzero(np.abs(x) > 0.01)
    return x[loud[0] : loud[-1] + 1]


def speech_track(script=SCRIPT, seconds: float = TRACK_S, gap_s: float = 0.08
                 ) -> tuple[np.ndarray, list[Spoken], list[tuple[float, float]]]:
    """The track (float32, TRACK_RATE) and the keywords' and sentences' times in it."""
    track = np.zeros(int(seconds * TRACK_RATE), np.float32)
    words, sentences = [], []
    gap = np.zeros(int(gap_s * TRACK_RATE), np.float32)
    for at, lead, keyword, tail in script:
        parts = [speak(lead), gap, speak(keyword), gap, speak(tail)]
        start = int(at * TRACK_RATE)
        kw_start = start + len(parts[0]) + len(gap)
        words.append(Spoken(keyword, kw_start / TRACK_RATE, (kw_start + len(parts[2])) / TRACK_RATE))
        sentence = np.concatenate(parts)
        track[start : start + len(sentence)] = 0.8 * sentence
        sentences.append((at, (start + len(sentence)) / TRACK_RATE))
    return track, words, sentences


def write_wav(path: Path, samples: np.ndarray, rate: int = TRACK_RATE) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


def _ffmpeg(args: list[str]) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True, timeout=120)


def _video_input(seconds: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size=160x120:rate=10:duration={seconds}"]


def make_speech_video(out_dir: Path, variant: str, script=SCRIPT) -> SpeechVideo:
    """The video of `variant` (a VARIANTS key), made once per directory and reused after."""
    suffix, audio_args, audio_shift, video_shift = VARIANTS[variant]
    out_dir.mkdir(parents=True, exist_ok=True)
    track, words, sentences = speech_track(script)
    wav = write_wav(out_dir / f"{variant}.wav", track)
    path = out_dir / f"{variant}{suffix}"
    seconds = TRACK_S
    if not path.exists():
        args = [*(["-itsoffset", str(video_shift)] if video_shift else []), *_video_input(seconds),
                *(["-itsoffset", str(audio_shift)] if audio_shift else []), "-i", str(wav),
                "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "ultrafast", "-g", "20",
                "-pix_fmt", "yuv420p", *audio_args, str(path)]
        _ffmpeg(args)
    # The video's clock starts at its first frame: audio times move by (audio shift - video shift).
    shift = audio_shift - video_shift
    on_clock = tuple(Spoken(w.word, w.start + shift, w.end + shift) for w in words)
    audio_start = max(0.0, shift)
    return SpeechVideo(path, on_clock, tuple((s + shift, e + shift) for s, e in sentences), audio_start,
                       TRACK_S + shift, seconds)


def make_silent_video(out_dir: Path, seconds: float = 8.0) -> Path:
    """A video with no audio stream at all."""
    path = out_dir / "no_audio.mp4"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _ffmpeg([*_video_input(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)])
    return path


def _garble_audio(src_path: Path, dst_path: Path, span: tuple[float, float] | None, seed: int) -> None:
    """Remux `src_path` into Matroska with the audio packets in `span` seconds (all of them when None) replaced
    by random bytes of the same size and timestamps: the container is intact, the decoder rejects them."""
    rng = np.random.default_rng(seed)
    with av.open(str(src_path)) as src, av.open(str(dst_path), "w") as dst:
        v_in, a_in = src.streams.video[0], src.streams.audio[0]
        v_out, a_out = dst.add_stream_from_template(v_in), dst.add_stream_from_template(a_in)
        for packet in src.demux(v_in, a_in):
            if packet.dts is None:
                continue  # the demuxer's end-of-stream packets
            if packet.stream is v_in:
                packet.stream = v_out
            else:
                t = float(packet.pts * a_in.time_base)
                if span is None or span[0] <= t < span[1]:
                    junk = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                    junk.pts, junk.dts, junk.time_base = packet.pts, packet.dts, packet.time_base
                    junk.duration = packet.duration
                    packet = junk
                packet.stream = a_out
            dst.mux(packet)


def make_corrupt_audio_video(out_dir: Path, broken: tuple[float, float] = (7.0, 13.0), seed: int = 5
                             ) -> tuple[SpeechVideo, tuple[float, float]]:
    """mkv (h264 + AAC) whose AAC packets between `broken` seconds are random bytes (the second sentence, with its
    keyword, lies inside). Returns the video, its truth as the clean file's, and the broken span."""
    clean = make_speech_video(out_dir, "mp4_aac_16k_mono")
    path = out_dir / "corrupt_audio.mkv"
    if not path.exists():
        _garble_audio(clean.path, path, broken, seed)
    return SpeechVideo(path, clean.words, clean.sentences, clean.audio_start, clean.audio_end,
                       clean.duration_s), broken


def make_undecodable_audio_video(out_dir: Path, seed: int = 6) -> Path:
    """mkv whose every AAC packet is random bytes: an audio stream that decodes to nothing."""
    clean = make_speech_video(out_dir, "mp4_aac_16k_mono")
    path = out_dir / "undecodable_audio.mkv"
    if not path.exists():
        _garble_audio(clean.path, path, None, seed)
    return path
