# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment in .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/.kecompress-installed: pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.kecompress-installed
	$(BIN)/kecompress evolve resnet18 --split kels --rate 0.5 --generations 3 --epochs 2 \
		--out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(BIN)/.kecompress-installed
	$(BIN)/python -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info
