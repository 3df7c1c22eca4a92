# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_RUN := demo-mae-$(shell date +%Y%m%d-%H%M%S)
# The demo's pretraining seed: `make demo SEED=1`.
SEED ?= 0

.PHONY: install demo test lint clean

install: $(VENV)/.installed

# torch/torchvision first at the versions this project is tested with, then the package.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# MAE pretraining on the embedded demo data (no labels), then a linear probe of the encoder's
# class token (MAE's probe) beside the same probe of a random-init encoder.
demo: install
	$(BIN)/pretrain --config configs/pretrain/demo_mae.yaml train.run_name=$(DEMO_RUN) train.seed=$(SEED)
	$(BIN)/finetune linear --encoder runs/$(DEMO_RUN) --config configs/finetune/demo.yaml --pool cls --compare-random-init

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check pretrain finetune tests benchmarks
	$(BIN)/ruff format --check pretrain finetune tests benchmarks

clean:
	rm -rf runs data_cache .pytest_cache
