# Two commands on a fresh machine:
#   make demo   create .venv, boot llmos on a temporary home, run the example, shut down
#   make test   create .venv, run the whole test suite (what .ci/run does)
# and for us:
#   make explore  the property-based tests with fresh random examples, 5x as many
#                 (CI runs them derandomized: the same examples every run)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test explore bench chaos gen clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python userland/examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

explore: $(STAMP)
	HYPOTHESIS_PROFILE=explore $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/conformance tests/test_proc_stateful.py tests/test_devices_stateful.py \
		tests/test_tensorfs_stateful.py tests/test_bad_input.py

bench: $(STAMP)
	$(BIN)/python bench/syscall_latency.py
	$(BIN)/python bench/tensorfs_bench.py
	$(BIN)/python bench/executor_bench.py
	$(BIN)/python bench/hf_bench.py
	$(BIN)/python bench/startup.py

chaos: $(STAMP)
	$(BIN)/python bench/chaos.py

gen: $(STAMP)
	$(BIN)/python -m syscalls.gen
	$(BIN)/python -m userland.gen

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
