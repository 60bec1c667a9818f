# Two commands on a fresh Debian machine (root, Python 3.11): `make demo`, `make test`.
# Each installs what it needs: system packages with apt-get, Python ones into .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# What the library and its tests need on the host.
APT_PKGS       := fuse3 libfuse3-dev pkg-config gcc python3-dev bubblewrap attr musl-tools busybox-static sqlite3
# The peers the benchmarks measure against, in the same run.
BENCH_APT_PKGS := fuse-overlayfs gocryptfs securefs fio

.PHONY: all sysdeps bench-sysdeps venv test demo bench lint format clean

all: test

sysdeps:
	@bash scripts/apt-ensure $(APT_PKGS)

bench-sysdeps:
	@bash scripts/apt-ensure $(APT_PKGS) $(BENCH_APT_PKGS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: sysdeps venv
	$(BIN)/pytest

demo: sysdeps venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo

bench: bench-sysdeps venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
