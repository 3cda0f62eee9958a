# Two commands on a fresh machine:
#   make demo   create .venv, boot llmos on a temporary home, run the example, shut down
#   make test   create .venv (and install Debian's chromium when missing), run the whole
#               test suite (what .ci/run does)
# and for us:
#   make explore  the property-based tests with fresh random examples, 5x as many
#                 (CI runs them derandomized: the same examples every run)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test explore bench serve-load compress-bench chaos net-bench \
	gen clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python userland/examples/demo.py

# Debian's Chromium, for the status-page test (tests/test_serve_browser.py skips,
# saying why, where it cannot be installed: no root, no package source)
browser:
	@command -v chromium >/dev/null 2>&1 || \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
	     >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
	     apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1) || \
	   echo "make browser: could not install chromium; the browser test will skip")

test: $(STAMP) browser
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
	$(BIN)/python bench/serve_bench.py
	$(BIN)/python bench/startup.py

# 1 to 32 streaming clients through llmos serve and back; the plot goes to docs/
serve-load: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/python bench/serve_load.py --png docs/serve_load.png

# a 10M Llama trained for a few minutes, then int8, structured pruning, distillation
compress-bench: $(STAMP)
	$(BIN)/python bench/compress_bench.py

chaos: $(STAMP)
	$(BIN)/python bench/chaos.py

# the TCP endpoint and nodes against raw ZeroMQ (docs/scaling.md)
net-bench: $(STAMP)
	$(BIN)/python bench/net_bench.py --mib 256
	$(BIN)/python bench/train_nodes_bench.py

gen: $(STAMP)
	$(BIN)/python -m syscalls.gen
	$(BIN)/python -m userland.gen

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
