"""Which model to run: `--model`, else `$VIDMINI_MODEL`, else the shipped default; data under `$VIDMINI_HOME`.

The default is the shipped demo model (`models/vidmini-demo`). On an install without it the choice is a tiny
random-weight model (built by `vidmini.service.models.open_model` on first use); everything that shows its name
says plainly that its answers are meaningless.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vidmini.common.fingerprint import fingerprint
from vidmini.common.paths import data_home

if TYPE_CHECKING:  # torch and transformers load in open_engine: choosing a model must not pay for them
    from vidmini.engine.inference import Engine

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL_DIR = REPO_ROOT / "models" / "vidmini-demo"
RANDOM_MODEL_NAME = "tiny-random"


@dataclass(frozen=True)
class ModelChoice:
    location: str
    label: str
    is_random: bool = False
    is_demo: bool = False


def choose_model(arg: str | None = None) -> ModelChoice:
    explicit = arg or os.environ.get("VIDMINI_MODEL")
    if explicit:
        return ModelChoice(explicit, explicit)
    if (SHIPPED_MODEL_DIR / "config.json").exists():
        return ModelChoice(str(SHIPPED_MODEL_DIR), "vidmini-demo (a demo model for the synthetic world)", is_demo=True)
    return ModelChoice(str(data_home() / "models" / RANDOM_MODEL_NAME), RANDOM_MODEL_NAME, is_random=True)


def frame_side_hint(choice: ModelChoice) -> int | None:
    """The side the chosen model's processor squares frames to, read from its JSON files without loading it; None
    when that needs more than a look at local folders (a Hugging Face id, a model not built yet, odd files). A
    hint: the ingest checks it against the loaded model's processor before trusting frames shrunk to it."""
    from vidmini.engine.hf_files import processor_side, read_json

    directory = Path(choice.location).expanduser()
    try:
        tower = read_json(directory / "config.json")["mm_vision_tower"]
        for candidate in (Path(tower).expanduser(), directory / tower):
            if candidate.is_dir():
                return processor_side(candidate)
    except Exception:  # noqa: BLE001 - any surprise only means "no hint"; loading will report real problems
        return None
    return None


def open_engine(choice: ModelChoice, dtype: str = "fp32", device: str = "cpu", prompt_style: str = "reference"
                ) -> Engine:
    import torch

    from vidmini.engine.checkpoint import load_checkpoint
    from vidmini.engine.inference import Engine
    from vidmini.engine.retrieval import RetrievalSpace

    loaded = load_checkpoint(choice.location, dtype=dtype, device=device)
    retrieval = None
    if loaded.vision_dir is not None:
        retrieval = RetrievalSpace.load(loaded.vision_dir, device=device,
                                        dtype=torch.float32 if device == "cpu" else loaded.model.dtype)
    return Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids, name=choice.label,
                  prompt_style=prompt_style, is_demo=choice.is_demo or choice.is_random, retrieval=retrieval,
                  weights=weights_fingerprint([loaded.directory, loaded.vision_dir]))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_fingerprint(directories: list[Path | None]) -> str:
    """Which weights these are: the cheap content key (size, first and last MiB) of every weight file under the
    checkpoint and vision-tower directories. Stored states are keyed by it, so a retrained model with the same
    config (`make model`, a new release) never reads states encoded by the old one."""
    files = sorted({p.resolve() for d in directories if d is not None for p in Path(d).rglob("*")
                    if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)})
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{fingerprint(p)};".encode())
    return h.hexdigest()[:16] if files else ""
