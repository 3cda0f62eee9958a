# Two commands on a fresh machine:
#   make demo   create .venv, boot llmos on a temporary home, run the example, shut down
#   make test   create .venv, run the whole test suite (what .ci/run does)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench gen clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python userland/examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/syscall_latency.py
	$(BIN)/python bench/executor_bench.py

gen: $(STAMP)
	$(BIN)/python -m syscalls.gen

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
