# Two commands on a fresh Debian machine (root, Python 3.11): `make demo`, `make test`.
# Each installs what it needs: system packages with apt-get, Python ones into .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The same project with every dependency at the floor pyproject.toml declares.
VENV_MIN := .venv-min
MIN_BIN  := $(VENV_MIN)/bin
# What the library and its tests need on the host.
APT_PKGS       := fuse3 libfuse3-dev pkg-config gcc python3-dev bubblewrap attr musl-tools busybox-static sqlite3
# The peers the benchmarks measure against, in the same run.
BENCH_APT_PKGS := fuse-overlayfs gocryptfs securefs fio openssl git

.PHONY: all sysdeps bench-sysdeps venv venv-min test test-fast test-floors demo bench lint format clean

all: test

sysdeps:
	@bash scripts/apt-ensure $(APT_PKGS)

bench-sysdeps:
	@bash scripts/apt-ensure $(APT_PKGS) $(BENCH_APT_PKGS)

venv: $(VENV)/.installed

# The project is installed editable as a plain path (.pth), not through
# setuptools' import hook, which costs every command ~10-20 ms of start-up
# (pathlib, re...); if a setuptools ever drops that mode, the default one.
EDITABLE := --config-settings editable_mode=compat

$(VENV)/.installed: pyproject.toml | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(EDITABLE) -e '.[dev]' 2>/dev/null \
		|| $(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(VENV_MIN)/.installed: pyproject.toml scripts/dependency-floors | sysdeps
	$(PYTHON) -m venv $(VENV_MIN)
	$(MIN_BIN)/pip install --quiet --upgrade pip
	$(PYTHON) scripts/dependency-floors pyproject.toml > $(VENV_MIN)/floors.txt
	$(MIN_BIN)/pip install --quiet -c $(VENV_MIN)/floors.txt $(EDITABLE) -e '.[dev]' 2>/dev/null \
		|| $(MIN_BIN)/pip install --quiet -c $(VENV_MIN)/floors.txt -e '.[dev]'
	touch $@

venv-min: $(VENV_MIN)/.installed

# The whole suite; then, at the dependency floors, the in-process tier and the
# FUSE tests that drive pyfuse3, the mount lifecycle and the CLI end to end
# (CI's budget holds one whole run; `make test-floors` runs it all at the floors).
FLOOR_FUSE_TESTS := tests/test_mount_lifecycle.py tests/sefs/test_sefs_fuse.py tests/test_adapter.py
test: sysdeps venv venv-min
	$(BIN)/pytest
	$(MIN_BIN)/pytest -p no:cacheprovider -m "not fuse"
	$(MIN_BIN)/pytest -p no:cacheprovider -m fuse $(FLOOR_FUSE_TESTS)

# The in-process tier: no FUSE mount (tests marked `fuse` drive one).
test-fast: venv
	$(BIN)/pytest -m "not fuse"

test-floors: sysdeps venv-min
	$(MIN_BIN)/pytest -p no:cacheprovider

demo: sysdeps venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo

# The filesystems' suites (image, sefs, union, soak), then the occlum command's.
bench: bench-sysdeps venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m libos.bench

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(VENV_MIN) .pytest_cache .ruff_cache .hypothesis
