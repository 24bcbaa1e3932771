# Two commands set everything up on a fresh machine:
#   make up    venv + install, start the embedded stack (broker, Redis, Milvus, flows, API), load the demo data
#   make test  the whole suite: unit, integration (real broker, Redis, Milvus, Feast), end-to-end
# Also: make down | status | bench | lint | schemas | compose-check

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: up down status test test-deps lint schemas bench bench-deps install system-deps compose-check

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@# torch is pinned (2.13.0 CPU); an unpinned torch would pull a multi-GB CUDA build.
	@$(BIN)/pip install --quiet -e '.[dev,bench]'
	@touch $(STAMP)

install: system-deps $(STAMP)

# Redis is the only system package the stack needs; install it where it is missing (as root).
system-deps:
	@command -v redis-server >/dev/null 2>&1 || redis-cli -p 6379 ping >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	    else echo "redis-server is missing: sudo apt-get install -y redis-server" >&2; exit 1; fi; }

up: install
	$(BIN)/python -m infra.stack up
	$(BIN)/python -m demo.load
	@echo "ready: http://127.0.0.1:8000/docs"

down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m infra.stack down; fi

status:
	@$(BIN)/python -m infra.stack status

lint: install
	$(BIN)/ruff check .

schemas: install
	$(BIN)/python -m schemas.export

# The overload chaos test drives the API with wrk (Debian's package): installed where missing
# (as root); elsewhere that one test skips, and says why.
test-deps:
	@command -v wrk >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null || true; \
	    else echo "wrk is missing (sudo apt-get install -y wrk): the overload test will skip" >&2; fi; }

test: install test-deps
	$(BIN)/python -m schemas.export --check
	$(BIN)/ruff check .
	$(BIN)/pytest

# The HTTP benchmarks drive the API with wrk (Debian's package); install it where missing (as root).
bench-deps:
	@command -v wrk >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	    else echo "wrk is missing: sudo apt-get install -y wrk" >&2; exit 1; fi; }

bench: install bench-deps
	$(BIN)/python -m bench

# `docker compose` (v2 plugin) where present, else Debian's docker-compose; no engine needed.
compose-check:
	@if docker compose version >/dev/null 2>&1; then docker compose config --quiet; else docker-compose config -q; fi
	@echo "docker-compose.yml is valid"
