# `make test` creates .venv (once; again only when the requirements change) and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dmmh-installed
# open_clip needs torchvision; on these machines this pair lies on local disk (a CPU-usable CUDA build).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: test docs env clean-env demo

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q $(TORCH_PIN) -e ".[test,docs]"
	touch $@

env: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m dmmh.demo

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict -d site

clean-env:
	rm -rf $(VENV)
