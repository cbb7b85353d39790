# SPADE — two commands on a fresh machine:
#   make demo   installs what is missing, then runs the main job on SynthPSG
#   make test   installs what is missing, then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.spade-installed
DEMO_OUT ?= output/demo
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo lint test bench clean

install: $(STAMP)

# Re-runs only when the dependency files change; a second `make install` does nothing slow.
$(STAMP): setup.py requirements.txt tools/install_detectron2.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -r requirements.txt
	bash tools/install_detectron2.sh $(PY)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import spade, detectron2; print('spade + detectron2 import OK')"
	touch $(STAMP)

demo: install
	$(PY) tools/run_demo.py --output $(DEMO_OUT) $(DEMO_ARGS)

# Formatter and linter (ruff.toml: 100 columns, pyflakes, pycodestyle, isort).
lint: install
	$(PY) -m ruff format --check . && $(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) output build *.egg-info
