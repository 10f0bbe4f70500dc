# Set-up is part of every target: a missing .venv is created, and pyproject.toml changes trigger a reinstall.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MLM := $(VENV)/bin/mlm
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DEMO_DATA := data/synth
DEMO_RUN := runs/tiny-synthetic

.PHONY: demo test test-slow lint format install clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# One stamp per set of extras: the demo needs only the package and its evaluation extra (a fresh clone's demo
# stays within 12 minutes); `make test` adds the development extras on top.
$(VENV)/.installed-demo: pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[eval]"
	touch $@

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[dev]"
	touch $@ $(VENV)/.installed-demo

install: $(VENV)/.installed

# synthesize -> train (resumes, so a finished run is not retrained) -> evaluate -> caption a few test images
demo: $(VENV)/.installed-demo
	$(MLM) data synth --out $(DEMO_DATA) --images 2000 --size 60 --seed 0
	$(MLM) data check $(DEMO_DATA) --split train
	$(MLM) train --config configs/tiny-synthetic.yaml --resume latest
	$(MLM) eval --checkpoint $(DEMO_RUN) --data $(DEMO_DATA) --split test --task all --out $(DEMO_RUN)/eval-test --markdown
	$(MLM) eval --checkpoint $(DEMO_RUN) --data $(DEMO_DATA) --split compositional --task retrieval --task vqa \
		--out $(DEMO_RUN)/eval-compositional --markdown
	$(MLM) eval --checkpoint $(DEMO_RUN) --data $(DEMO_DATA)/classify_shape.csv --task zeroshot \
		--out $(DEMO_RUN)/eval-zeroshot-shape
	$(MLM) caption --checkpoint $(DEMO_RUN) $(DEMO_DATA)/images/00000000180[1-5].png

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed browser
	$(PY) -m pytest -q -m slow

# Headless Chromium for the demo's browser test: Debian's chromium package (as root) and playwright from PyPI;
# playwright's own browser download is never used.
browser: $(VENV)/.installed
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	$(PY) -m pip install -q playwright

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mlm tests
	$(VENV)/bin/ruff format --check mlm tests

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix mlm tests
	$(VENV)/bin/ruff format mlm tests

clean:
	rm -rf $(VENV) runs data .pytest_cache
