# crashlab: `make matrix` runs the main job, `make test` runs the tests.
# Each target does its own set-up from a fresh clone (Python venv, Docker engine, QEMU, binfmt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= results
UNAME  := $(shell uname -s)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup setup-python setup-system test test-unit matrix durability bench clean

help: ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-12s %s\n", $$1, $$2}'

setup: setup-python setup-system ## Install everything: venv, Docker engine, QEMU, emulation, images

setup-python: $(BIN)/crashlab ## Create .venv and install crashlab with its test tools

$(BIN)/crashlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

setup-system: ## Docker engine, QEMU and binfmt (Linux); checks Docker Desktop (macOS)
ifeq ($(UNAME),Darwin)
	bash docker/setup-macos.sh
else
	$(SUDO) bash docker/setup-linux.sh
endif

test: setup ## Run every test: unit, and integration on the real engine and QEMU
	$(BIN)/python -m pytest -m "not soak" $(PYTEST_ARGS)

test-unit: setup-python ## Unit tests only (no Docker, no QEMU)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

matrix: setup ## The seed matrix: journal modes x sync x arch x storage x fault, host as control
	$(BIN)/crashlab run scenarios/seed-matrix.yaml --out $(OUT)

durability: setup ## Process crash vs OS crash: containers and QEMU guests
	$(BIN)/crashlab run scenarios/durability.yaml --out $(OUT)

bench: setup ## Trials per minute per platform, against bare loops in the same process
	$(BIN)/python -m harness.bench

clean: ## Remove containers, volumes and VMs crashlab left behind
	$(BIN)/crashlab clean
