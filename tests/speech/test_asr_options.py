"""The audio options of `vidmini ingest`, `ask` and `summarize` (and of the service's IngestOptions): bad input is
one line on stderr and exit status 2, before any model loads."""

from __future__ import annotations

import pytest

from vidmini.cli.main import main as cli
from vidmini.service.options import IngestOptions


@pytest.mark.parametrize("flags, why", [
    (["--asr", "vosk"], "--asr must be one of pocketsphinx, whisper, none"),
    (["--no-audio", "--asr", "whisper"], "contradict"),
    (["--asr", "pocketsphinx", "--asr-model", "openai/whisper-tiny"], "use it with --asr whisper"),
    (["--asr-model", "/no/such/model"], "no such folder"),
    (["--asr", "pocketsphinx", "--language", "de"], "English model only"),
    (["--language", "12"], "language must be a language code"),
    (["--no-audio", "--language", "en"], "--language applies to a transcript"),
    (["--asr", "whisper"], "--asr whisper needs --asr-model"),
    (["--asr", "whisper", "--language", "de"], "--asr whisper needs --asr-model"),
    (["--asr-workers", "0"], "--asr-workers must be >= 1"),
])
@pytest.mark.parametrize("command", ["ingest", "ask", "summarize"])
def test_bad_audio_flags_are_one_line_and_exit_2(command, flags, why, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path))
    video = tmp_path / "v.mp4"
    video.write_bytes(b"never read")
    args = {"ingest": ["ingest", str(video)], "ask": ["ask", str(video), "what is shown?"],
            "summarize": ["summarize", str(video), "--out", str(tmp_path / "out")]}[command]
    assert cli([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidmini: error: ") and why in err and err.count("\n") == 1, err
    assert not (tmp_path / "videos").exists() and not (tmp_path / "transcripts").exists()


def test_ingest_options_check_the_audio_fields():
    assert IngestOptions().asr == "pocketsphinx" and IngestOptions().check().language is None
    assert IngestOptions(asr="whisper", asr_model="openai/whisper-tiny", language="de").check().asr == "whisper"
    assert IngestOptions(asr="pocketsphinx", language="en-US").check()
    assert IngestOptions(asr="none").check()
    for bad, why in [({"asr": "vosk"}, "asr must be"), ({"asr_model": "m"}, "for the whisper backend"),
                     ({"asr": "whisper"}, "asr whisper needs an ASR model"), ({"asr_workers": 0}, "asr-workers"),
                     ({"language": "english!"}, "language code"), ({"language": "fr"}, "English model only")]:
        with pytest.raises(ValueError, match=why):
            IngestOptions(**bad).check()
    # the audio is not part of the frames' identity: the same store whatever the recognizer
    assert IngestOptions(asr="none").sampling_key() == IngestOptions().sampling_key()
