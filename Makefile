# Quick start: `make run` and `make test` do all set-up on a fresh clone (venv, Python packages, ffmpeg).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SAMPLE ?= ../shared/fixtures/videos/safari.mp4
QUESTION ?= What is happening in this video?
PORT ?= 8501

.PHONY: install sysdeps run demo run-sample test lint bench model eval clean

# torch is pinned to the CPU wheel this machine carries; a GPU user installs their own torch first.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q "torch>=2.4,<=2.14.1"
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

sysdeps:
	@command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg) \
	    >/dev/null || echo "warning: could not install ffmpeg (tests that need the ffmpeg CLI will skip)"; }
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium chromium-driver) >/dev/null || echo "warning: could not install chromium (the browser test will skip)"; }

install: $(STAMP) sysdeps

# The app (README: App): the sample synthetic-world video is put in the library first (made and ingested once,
# under $$VIDMINI_HOME), then Streamlit serves on 127.0.0.1:$(PORT) (`make run PORT=8600`).
run: install
	$(BIN)/vidmini sample
	$(BIN)/streamlit run streamlit_app.py --server.address 127.0.0.1 --server.port $(PORT)

# The offline demo in the terminal: the sample video, one question per family, the model's answers next to the
# truth; `make run-sample` asks about a real fixture video instead.
demo: install
	$(BIN)/vidmini demo

run-sample: install
	$(BIN)/vidmini ask "$(SAMPLE)" "$(QUESTION)"

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/qa_latency.py

# Retrain the shipped demo model (seeded; 2 h 04 min on the 2-core CPU on 2026-12-03) and evaluate it on held-out videos.
model: install
	$(BIN)/python -m synth.train --out models/vidmini-demo

eval: install
	$(BIN)/python bench/eval_default_model.py --seed 1 --n 600

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
