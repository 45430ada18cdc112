# Two entry points for a newcomer: `make demo` and `make test`. Both create ./.venv on first use.
# TORCH_SPEC pins the PyTorch build the venv gets; the project itself only asks for torch>=2.3, so
# GPU users installing with `pip install -e .` keep their CUDA build. Override, e.g.:
#   make test TORCH_SPEC='torch>=2.3'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.dreamcoeff-installed

.PHONY: setup lint format test test-slow test-all test-stress test-diffusers-floor test-diffusers-newest demo docs bench bench-micro pretrain-micro pretrain-micro-v2 pretrain-micro-v2r clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# ruff (configured in pyproject.toml): lint and formatting check; `make format` rewrites. Then dead code:
# functions and flags nothing calls (tools/dead_code.py, vulture plus a check that every flag is read).
lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python tools/dead_code.py

format: $(STAMP)
	$(BIN)/python -m ruff format .
	$(BIN)/python -m ruff check --fix .

# `make test`: lint, then every test not marked slow, on both cores (pytest-xdist workers: each has
# its own tmp folders, the two-rank tests pick free ports, the CPU kernel's build is locked).
# `make test-slow`: the slow end-to-end tests (kills, SIGTERMs, two-rank launches, the demo, the
# installed wheel), one process, since they time real processes. CI (.ci/run) runs both;
# `make test-all` is the same locally. PYTEST_WORKERS=0 runs the fast set in one process.
test: lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all: test test-slow

# The diffusers-facing tests (one process, -x) against another diffusers release, installed with
# --no-deps into build/diffusers-<version> and put first on PYTHONPATH; torch and the rest stay the
# venv's (tools/test_diffusers.sh). `test-diffusers-floor`: the floor pyproject.toml names;
# `test-diffusers-newest`: the newest release on the index (the venv's own: said, and run on the venv).
# Results per release: docs/pipelines.md, "diffusers versions".
test-diffusers-floor: $(STAMP)
	PYTHON=$(BIN)/python tools/test_diffusers.sh floor $(PYTEST_ARGS)

test-diffusers-newest: $(STAMP)
	PYTHON=$(BIN)/python tools/test_diffusers.sh newest $(PYTEST_ARGS)

# The timing-sensitive tests (reliability, locking, stopping, two ranks) STRESS_N times (default 5), with
# each test's pass count: `make test-stress STRESS_N=10`.
test-stress: $(STAMP)
	$(BIN)/python tests/stress.py $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m dreamcoeff.demo --output_dir demo_out --model models/microworld-sdxl-v2 --instance_dir samples/instance

# docs/cli.md, the flag reference, from the trainer's and the sampler's parsers (tests/test_docs.py
# fails until it is rerun after a flag changes).
docs: $(STAMP)
	$(BIN)/python tools/write_cli_docs.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_attention.py
	$(BIN)/python benchmarks/bench_train_step.py

# Micro-DreamBench (benchmarks/micro): every method on the shipped micro-world model, two processes,
# on both concept sets (texture, then recombination; about an hour each on 2 cores).
bench-micro: $(STAMP)
	$(BIN)/python benchmarks/micro/run_bench.py --jobs 2 --concept_set texture
	$(BIN)/python benchmarks/micro/run_bench.py --jobs 2 --concept_set recombination

# Re-create the shipped micro-world model and check it matches bit for bit (about an hour of CPU).
pretrain-micro: $(STAMP)
	$(BIN)/python benchmarks/micro/pretrain.py --out build/microworld-sdxl --log build/pretrain_log.json \
		--check_against benchmarks/micro/pretrain_log.json

# The v2 micro-world model (SDXL's 10 / 20 heads, v1's VAE) in two resumable parts of about an hour
# each on 2 cores; a stopped part continues when the target is run again. Checks the shipped hashes.
V2_PRETRAIN = $(BIN)/python benchmarks/micro/pretrain.py --model_version v2 --vae_from models/microworld-sdxl \
	--out build/microworld-sdxl-v2 --log build/v2/pretrain_log.json --state build/pretrain_v2.state --threads 2
pretrain-micro-v2: $(STAMP)
	mkdir -p build/v2
	$(V2_PRETRAIN) --stop_after 2000
	$(V2_PRETRAIN) --check_against benchmarks/micro/v2/pretrain_log.json

# The refinement set's base model: v2 continued 600 steps with the colour word dropped from 30% of the
# captions (benchmarks/micro/README.md, "amendment of the rule's base model"), in resumable parts (rerun
# to continue from the state), one thread as the shipped run. Checks the shipped hashes.
pretrain-micro-v2r: $(STAMP)
	mkdir -p build/v2r
	$(BIN)/python benchmarks/micro/pretrain.py --continue_from models/microworld-sdxl-v2 --colour_drop 0.3 \
		--steps 600 --lr 3e-4 --class_colours 4 --eval_samples 0 --threads 1 --save_every 50 \
		--state build/pretrain_v2r.state --out build/microworld-sdxl-v2r --log build/v2r/pretrain_log.json \
		--check_against benchmarks/micro/v2r/pretrain_log.json

clean:
	rm -rf $(VENV) demo_out .pytest_cache
