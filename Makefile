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
	$(BIN)/pip install --quiet -e '.[test,ui,canny]'
	# k-diffusion, a test oracle: without its dependencies (wandb, clean-fid, clip, kornia, ... for its training
	# code); the tests load its sampling module alone, whose imports the test extra has (tests/sampler_oracles.py)
	$(BIN)/pip install --quiet --no-deps k-diffusion==0.1.1.post1

# Most files on two workers, a file each at a time, one torch thread each; then, alone, the torchrun ranks and the
# browser: run beside the other worker they failed now and then (a gloo rank aborting, the page reloading)
ALONE := tests/test_distributed.py tests/test_controlnet_distributed.py tests/test_bench.py tests/test_ui.py
test:
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile $(addprefix --ignore=,$(ALONE))
	$(BIN)/python -m pytest -q $(ALONE)

# Time, memory and work per scale on the tiny random model, 2 steps a scale, without the comparison with the
# reference implementation (seconds on a CPU); results in bench/results/. BENCH= runs every section at 50 steps.
# More: make bench BENCH="--model sdxl --no-generate --components full --loading --max-memory 8,24"
BENCH ?= --steps 2 --components none --overhead-real no
bench:
	$(BIN)/python -m bench $(BENCH)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
