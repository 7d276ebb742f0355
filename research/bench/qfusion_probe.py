"""Issue-4 probe behind the RESULTS rows "question fusion from the old shipped weights": add the third pre-fusion
layer to a trained demo model, run question fusion (synth.qfusion), then the LLM stage (synth.train.stage2), and
save the result for `research/bench/eval_default_model.py --model OUT`.

The rows were run from the weights shipped at commit 65e72a7 (restore them with
`git show 65e72a7:models/vidmini-demo/model.safetensors > …` plus the other files of that directory):

  python -m research.bench.qfusion_probe --src OLD_MODEL_DIR --out /tmp/qf --qfusion-steps 1500 --stage2-steps 1000
  python -m research.bench.eval_default_model --seed 1 --n 600 --model /tmp/qf
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel

from research.training.qfusion import QFusionConfig, add_prefusion_layer, run_question_fusion
from research.training.train import TRAIN_SEED_BASE, TrainConfig, load_video, normalize, stage2
from vidmini.demo.model import save_demo
from vidmini.engine.load import ModelChoice, open_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True, help="a trained demo model directory (two pre-fusion layers)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--videos", type=int, default=1500)
    ap.add_argument("--qfusion-steps", type=int, default=1500)
    ap.add_argument("--stage2-steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    engine = open_engine(ModelChoice(str(args.src), "probe"))
    model, tok = engine.model, engine.tokenizer
    size = model.vision.vision_tower.config.image_size
    t0 = time.perf_counter()
    add_prefusion_layer(model)
    videos = [load_video(TRAIN_SEED_BASE + 7_000_000 + i, int(rng.integers(10, 17)), size) for i in range(args.videos)]
    held = [load_video(TRAIN_SEED_BASE + 8_000_000 + i, 30, size) for i in range(30)]
    run_question_fusion(model, tok, videos, held, normalize, QFusionConfig(steps=args.qfusion_steps, every=250), rng)
    del videos
    lrng = np.random.default_rng(1)
    cfg = TrainConfig(stage2_steps=args.stage2_steps)
    long = [load_video(TRAIN_SEED_BASE + 6_000_000 + i, int(lrng.integers(60, 601)), size)
            for i in range(cfg.long_videos)]
    stage2(model, tok, long, cfg, lambda row: None, lrng)
    model.eval()
    save_demo(model, CLIPModel.from_pretrained(str(args.src / "vision_tower")), tok, args.out)
    shutil.copy(args.src / "training_config.json", args.out / "training_config.json")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
