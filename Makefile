# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned here (not in pyproject.toml) to the builds that install from local disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
RUN ?= runs/demo

.PHONY: venv demo test lint bench gpu-check clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e ".[all,test]"
	touch $@

venv: $(BIN)/.installed

# REED training on the embedded default (sklearn digits), then samples from the trained EMA model.
demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/reed fit-encoder configs/demo.yaml
	HF_HUB_OFFLINE=1 $(BIN)/reed train configs/demo.yaml --out $(RUN) --overwrite
	HF_HUB_OFFLINE=1 $(BIN)/reed sample $(RUN) --num 1000 --out $(RUN)/samples.npz
	HF_HUB_OFFLINE=1 $(BIN)/reed evaluate $(RUN)/samples.npz --run $(RUN) --out $(RUN)/eval.json
	@echo "demo done: see $(RUN)/samples.png, $(RUN)/loss.png, $(RUN)/eval.json and $(RUN)/samples/"

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/target_store.py
	$(BIN)/python benchmarks/throughput.py --cpu-subset
	$(BIN)/python benchmarks/convergence.py

# The one-call device check (benchmarks/gpu_check.py): on a machine with one CUDA GPU, with this checkout's .venv
# or, on a bare GPU image that already holds torch, its python3 (nothing is installed or downloaded).
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,PYTHONPATH=src $(PY))
gpu-check:
	HF_HUB_OFFLINE=1 $(GPU_PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs .cache
