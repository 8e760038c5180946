# One command each on a fresh machine: `make demo` (set up, run the default job), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision first, as the tested pair, so pip never resolves a different torch.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench wheel-check gpu-wheels gpu-check floor-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

DEMO_RUN := runs/mnist-lenet-filter

# A second `make demo` resumes an interrupted demo run or re-reports a finished one.
demo: setup
	if [ -f $(DEMO_RUN)/config.yaml ]; then $(VENV)/bin/rapc compress --resume $(DEMO_RUN); else $(VENV)/bin/rapc compress; fi

# TEST_WORKERS pytest workers (2: CI's cores; more on a bigger machine), each test file on one worker
# (module fixtures built once), one thread each (torch and onnxruntime follow OMP_NUM_THREADS): on
# 2 cores the suite takes about half the time of one process with two threads.
TEST_WORKERS ?= 2

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
	$(PY) scripts/wheel_check.py

# rapc as `pip install rapc` gives it: the wheel, installed (not editable) into a fresh venv outside
# the tree; every command's --help and a tiny digits compress -> export -> bench -> study from there.
wheel-check: setup
	$(PY) scripts/wheel_check.py

# The GPU proof. gpu-wheels, where PyPI is reachable: rapc's wheel and what the GPU machines lack of
# its dependencies, for CPython 3.12 x86-64, into $(GPU_WHEELS) (at most 32 MiB). gpu-check, on the
# GPU machine (no network, no .venv; $(GPU_PYTHON) is the interpreter with torch), with that folder:
# install without an index, gpu tests, compress/export/bench on CUDA; tables to $$OUT or gpu-check-out/.
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= python3

gpu-wheels: setup
	$(PY) scripts/gpu_wheels.py --dest $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py --wheels $(GPU_WHEELS)

# pyproject's lower bounds, run: these versions over .venv, then the wheel check and the tests of
# the installed wheel (downloads torch 2.11, about 0.5 GB; not part of `make test`).
FLOOR := torch==2.11.0 torchvision==0.26.0 onnxruntime==1.30.0 click==8.2.1 rich==13.9.4 \
	pydantic==2.13.5 pydantic-core==2.46.5 scikit-learn==1.8.0

floor-check: setup
	$(PY) scripts/floor_check.py $(FLOOR)

bench: setup
	$(PY) benchmarks/compress_speed.py
