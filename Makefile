# Each target sets itself up: a virtual environment with torch 2.13.0 (CPU wheel) and d9d built against it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d9d-installed

.PHONY: demo test lint clean cpptest cpp-deps

$(STAMP): setup.py pyproject.toml $(shell find csrc -name "*.cpp" -o -name "*.h" -o -name "*.cu")
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[test,finetune]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# ruff, the C++ unit tests of the ops, then the Python suite (unit, op and torchrun multi-process tests).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(MAKE) cpptest
	$(PY) -m pytest -q

# C++ unit tests of the ops: CMake against the installed torch's libtorch, GoogleTest from Debian.
cpptest: $(STAMP) cpp-deps
	export PATH="$(abspath $(VENV))/bin:$$PATH"; \
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  && cmake --build build/cmake && ctest --test-dir build/cmake --output-on-failure

cpp-deps:
	@if [ ! -f /usr/include/gtest/gtest.h ] || ! command -v cmake >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq cmake libgtest-dev; \
	  else echo "the C++ tests need cmake and GoogleTest: sudo apt-get install -y cmake libgtest-dev" >&2; exit 1; fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info d9d/_C*.so
