# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

export RAY_AUTH_MODE ?= disabled
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup browser test test-fast demo lint bench clean

setup: $(STAMP)

# torch goes in first, on its own, so the CPU wheel is used (see FACTS.md); the stamp depends on
# pyproject.toml so an unchanged tree makes `make setup` a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# the UI checks open the Prefect UI in a real browser: Debian's chromium (FACTS.md)
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || { echo "make: the UI tests need Debian's chromium: apt-get install chromium" >&2; exit 1; }

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/bard demo

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
