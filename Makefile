# Each target sets itself up: a virtual environment with torch 2.13.0 (CPU wheel) and d9d built against it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d9d-installed

.PHONY: demo test lint bench clean cpptest

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[test,finetune]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# C++ unit tests of the ops (needs cmake and GoogleTest: apt-get install -y cmake libgtest-dev).
cpptest: $(STAMP)
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info d9d/_C*.so
