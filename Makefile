# `make demo` and `make test` each do all the set-up on a fresh machine: a virtual
# environment in .venv with everything installed, then the package built in place.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.taca-installed
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.c csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: demo test install bench clean
demo: install
	$(VENV)/bin/taca demo
	@echo "taca is installed in $(VENV), not on PATH: 'source $(VENV)/bin/activate' to use taca and python with taca" \
	      "in this shell, or call $(VENV)/bin/taca and $(VENV)/bin/python."

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/bench_attention.py

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf build *.egg-info taca/*.so $(VENV)
