# Quick start: `make run` and `make test` do all set-up on a fresh clone (venv, Python packages, ffmpeg).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SAMPLE ?= ../shared/fixtures/videos/safari.mp4
QUESTION ?= What is happening in this video?
PORT ?= 8501

LATEST := .venv-latest
LOCK_FROM ?= $(VENV)
PYTEST_ARGS ?=

.PHONY: install sysdeps run demo run-sample test lint bench model eval clean lock deps-latest

# torch is pinned to the CPU wheel this machine carries; a GPU user installs their own torch first.
# Every other package is installed at the version in constraints.txt: the set the suite last passed on.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q "torch>=2.13.0,<2.14"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

sysdeps:
	@command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg) \
	    >/dev/null || echo "warning: could not install ffmpeg (tests that need the ffmpeg CLI will skip)"; }
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium chromium-driver) >/dev/null || echo "warning: could not install chromium (the browser test will skip)"; }
	@test -x /usr/sbin/mosquitto || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto) \
	    >/dev/null || echo "warning: could not install mosquitto (the MQTT tests in tests/watch will skip)"; }
	@command -v espeak-ng >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng) \
	    >/dev/null || echo "warning: could not install espeak-ng (the speech tests in tests/speech will skip)"; }

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
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m research.bench.qa_latency

# Retrain the shipped demo model (seeded; 2 h 04 min on the 2-core CPU on 2026-12-03) and evaluate it on held-out videos.
model: install
	$(BIN)/python -m research.training.train --out models/vidmini-demo

eval: install
	$(BIN)/python -m research.bench.eval_default_model --seed 1 --n 600

# Rewrite constraints.txt from $(LOCK_FROM)'s pip freeze (pip, vidmini itself, direct-URL installs and local build
# tags such as +cpu left out; setuptools kept: torch needs it). Only after a green `make test`, or a green
# whole-suite `make deps-latest` with LOCK_FROM=$(LATEST); then raise pyproject.toml's lower bounds to match.
lock:
	@test -x $(LOCK_FROM)/bin/python || { echo "no $(LOCK_FROM): make install and make test first"; exit 1; }
	{ echo "# The exact versions the test suite last passed on: pip freeze of the venv, vidmini itself left out."; \
	  echo "# make install installs with pip install -c constraints.txt, so a fresh clone gets these versions;"; \
	  echo "# make deps-latest tries the newest releases pyproject.toml's bounds allow, without this file."; \
	  echo "# Locked $$(date -u +%Y-%m-%d) on Python $$($(LOCK_FROM)/bin/python -c 'import platform; print(platform.python_version())')" \
	       "with torch's CPU build ($$($(LOCK_FROM)/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))'))."; \
	  echo "# Regenerate with make lock, only after a green make test."; \
	  $(LOCK_FROM)/bin/python -m pip freeze --all --exclude-editable | grep -E '^[A-Za-z0-9._-]+==' | grep -v '^pip==' \
	    | sed -E 's/\+[A-Za-z0-9.]+$$//' | LC_ALL=C sort -f; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	if [ "$(LOCK_FROM)" = "$(VENV)" ] && [ -f $(STAMP) ]; then touch $(STAMP); fi

# The suite on the newest releases pyproject.toml's bounds allow, in a separate venv ($(LATEST), made anew each
# time; constraints.txt not used): prints what differs from constraints.txt and what broke, and fails if anything
# did. `make deps-latest PYTEST_ARGS="tests/engine/test_prompt.py -q"` runs a subset. torch stays the CPU wheel on disk.
deps-latest: sysdeps
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q torch==2.13.0
	$(LATEST)/bin/python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch.txt -e '.[dev,ray]'
	PYTEST_ARGS='$(PYTEST_ARGS)' $(LATEST)/bin/python research/deps_latest.py

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .ruff_cache *.egg-info
