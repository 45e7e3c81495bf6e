# Everything sets itself up: a fresh clone needs only python3 (3.10+) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test lint demo bench gpu-check rehearse learn setup-check toy-check clean

$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt pyproject.toml scripts/setup_env.py
	$(PYTHON) scripts/setup_env.py --venv $(VENV)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(STAMP)  ## create .venv with the pinned dependencies (once)

lint: setup  ## ruff + notebooks committed without outputs
	$(BIN)/ruff check .
	$(BIN)/python scripts/notebooks.py check

test: lint  ## library tests + every notebook through papermill on the tiny profile, offline
	$(BIN)/python -m pytest

demo: setup  ## run the whole course (notebooks 01..) on the toy model (trained once per machine), offline; then the README's two pictures (docs/images)
	$(BIN)/python -m kolors_lib tiny-kolors --toy --profile toy --workdir workdir/demo  # once per machine: its notice and bar show here
	$(BIN)/python scripts/notebooks.py run --profile toy --workdir workdir/demo
	$(BIN)/python scripts/readme_images.py --workdir workdir/demo --out docs/images

bench: setup  ## real-size Kolors, random weights: memory and speed, ours vs stock (results: docs/benchmarks.md)
	$(BIN)/python scripts/bench.py

gpu-check: setup  ## on a CUDA GPU (<= 8 min, nothing downloaded): every planned phase measured vs the plan (JSON in workdir/gpu-check)
	$(BIN)/python scripts/gpu_check.py

rehearse: setup  ## notebooks 01..06 on profile full with a real-size random Kolors, on CPU (writes ~17 GB once)
	KOLORS_REHEARSE=1 $(BIN)/python -m pytest -m slow tests/test_fullsize.py -k rehearsal -s

learn: setup  ## the honest checks on the toy Kolors (trained once per machine, ~10 min): a LoRA learns its pictures, not from no data; the toy draws what it is asked; step 03's LoRA makes the ink style visible; best-of-N
	KOLORS_LEARN=1 $(BIN)/python -m pytest -m slow tests/test_it_learns.py tests/test_toy_kolors.py -s

setup-check: setup  ## notebooks/00_setup on a simulated GPU notebook image (network installs, ~10 min): torch kept, pip check clean, short output
	KOLORS_SETUP_CHECK=1 $(BIN)/python -m pytest -m slow tests/test_setup_env.py -k notebook_image -s

toy-check: setup  ## issue 21's three checks alone (also in make learn): the toy draws what it is asked; step 03's LoRA shows the ink style; best-of-N
	KOLORS_TOY_CHECKS=1 $(BIN)/python -m pytest -m slow tests/test_toy_kolors.py -s

clean:
	rm -rf workdir .pytest_cache .ruff_cache
