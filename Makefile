PYTHON ?= python3
VENV   ?= .venv
# open_clip (a test oracle) imports torchvision, whose compiled ops must come from the same torch build:
# pin the pair. Override for another build, e.g. make install TORCH="torch==2.9.1 torchvision==0.24.1".
TORCH  ?= torch==2.14.1 torchvision==0.29.1
BIN    := $(VENV)/bin

.PHONY: install test bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'

test:
	$(BIN)/python -m pytest -q

# Time, memory and work per scale on the tiny random model (seconds on a CPU); results in bench/results/.
# More: make bench BENCH="--model sdxl --components full --loading --predict-sizes 2048,3072,4096 --max-memory 8,12,24"
BENCH ?=
bench:
	$(BIN)/python -m bench $(BENCH)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
