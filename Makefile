# .venv is built in two steps, each once (again only when pyproject.toml or this file change):
#   core: dmmh and its core dependencies, all that `make demo` needs;
#   dev:  core plus the test and docs extras, for `make test` and `make docs`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.dmmh-core
DEV := $(VENV)/.dmmh-dev
# open_clip (in the test extra) needs torchvision; on the project's machines this pair lies on local
# disk (a CPU-usable CUDA build: torch and its CUDA libraries are most of the environment's size).
TORCH := torch==2.14.1
TORCHVISION := torchvision==0.29.1

.PHONY: test docs env demo clean-env

$(CORE): pyproject.toml Makefile
	@echo ">> $(VENV): installing dmmh and its core dependencies (torch, lightning, ...); first run only"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) -e .
	touch $@

$(DEV): $(CORE)
	@echo ">> $(VENV): adding the test and docs extras (open_clip, faiss, safetensors, matplotlib, pytest, mkdocs, ...); first run only"
	$(PY) -m pip install -q $(TORCH) $(TORCHVISION) -e ".[test,docs]"
	touch $@

env: $(DEV)

test: $(DEV)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(CORE)
	@echo ">> training DMMH on the UCI digits embedded in dmmh, at 16/32/64 bits (about 30 s on 2 CPU cores)"
	$(PY) -m dmmh.demo

docs: $(DEV)
	$(VENV)/bin/mkdocs build --strict -d site

clean-env:
	rm -rf $(VENV)
