# Two entry points, as in README.md:
#   make demo   install echoes and run the main job (an ESN on the built-in synthetic videos)
#   make test   install the dev and test dependencies and services, then run every check and test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install install-dev services check-clean lint nbtest pytest tree-untouched readme

demo: install
	$(BIN)/echoes train --model esn

test: install-dev services check-clean lint nbtest pytest tree-untouched

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"

# Azurite from npm; headless Chromium from apt (the tests start and stop both themselves).
services:
	npm install --no-audit --no-fund --loglevel=error
	command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver)

# Notebooks are the source: cleaning them and exporting the library must change nothing.
check-clean:
	@before=$$(git status --porcelain; git diff | sha1sum); \
	$(BIN)/nbdev-clean && $(BIN)/nbdev-export; \
	after=$$(git status --porcelain; git diff | sha1sum); \
	if [ "$$before" != "$$after" ]; then echo "nbdev-clean/nbdev-export changed the tree: run them and commit"; git status --short; exit 1; fi
	$(BIN)/python tools/nb2readme.py --check

lint:
	$(BIN)/ruff check echoes tests bench tools

nbtest:
	$(BIN)/nbdev-test --n-workers 2

pytest:
	$(BIN)/pytest -q

# Tests write only under runs/ and temporary folders: nothing in the tree changes (checked on CI's clean clone).
tree-untouched:
	@dirty=$$(git status --porcelain --untracked-files=all); \
	if [ -n "$$dirty" ] && [ "$$CI" = true ]; then echo "the tests wrote into the tree:"; echo "$$dirty"; exit 1; fi

readme:
	$(BIN)/python tools/nb2readme.py
