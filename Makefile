# One command each on a fresh machine: `make demo` (set up, run the default job), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision first, as the tested pair, so pip never resolves a different torch.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

DEMO_RUN := runs/mnist-lenet-filter

# A second `make demo` resumes an interrupted demo run or re-reports a finished one.
demo: setup
	if [ -f $(DEMO_RUN)/config.yaml ]; then $(VENV)/bin/rapc compress --resume $(DEMO_RUN); else $(VENV)/bin/rapc compress; fi

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/compress_speed.py
