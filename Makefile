# The same targets for people and CI. `make run` runs the worker; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-runtime
NODE_DIRS := tests/node contract/node

.PHONY: run test test-python test-node check lint install node-deps bench prompt-tokens lock clean \
	stop-redis

run: $(RUN_STAMP) ## run the worker (starts a private Redis on this machine if none answers)
	./scripts/ensure-redis.sh
	exec $(PY) -m worker

stop-redis: ## stop the private redis-server(s) `make run` started (pid files in .run/)
	@for pidfile in .run/redis-*.pid; do \
	  [ -e "$$pidfile" ] || { echo "no private redis-server is running"; break; }; \
	  kill "$$(cat "$$pidfile")" && echo "stopped the redis-server of $$pidfile"; \
	  rm -f "$$pidfile"; \
	done

test: install node-deps lint ## every test: lint, Python (pytest) and Node (node --test)
	./scripts/ensure-redis.sh
	$(PY) -m pytest
	npm --prefix contract/node test

test-python: install node-deps
	./scripts/ensure-redis.sh
	$(PY) -m pytest

test-node: install node-deps
	./scripts/ensure-redis.sh
	npm --prefix contract/node test

check: $(RUN_STAMP) ## is this configuration fit to run? (settings, Redis, processors)
	$(PY) -m worker check

lint: install
	$(PY) -m ruff check worker processors tests bench
	$(PY) -m ruff format --check worker processors tests bench
	$(PY) -m mypy

install: $(STAMP) ## everything: the runtime and the test and lint tools

# `make run` needs the runtime lock only; tests and lint add requirements-dev.lock on top.
$(RUN_STAMP): requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $@

$(STAMP): $(RUN_STAMP) requirements-dev.lock
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.lock
	touch $@

node-deps: $(addsuffix /node_modules/.installed,$(NODE_DIRS))

%/node_modules/.installed: %/package-lock.json
	npm ci --prefix $* --no-audit --no-fund --loglevel=error
	touch $@

bench: install bench/node_modules/.installed ## Python vs Node worker, side by side (ARGS=--quick: 1 round)
	./scripts/ensure-redis.sh
	$(PY) bench/run.py $(ARGS)

prompt-tokens: install ## tokens per job: the prompts of main (ARGS=--ref REF) against this tree
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements-tokens.txt
	./scripts/ensure-redis.sh
	$(PY) bench/prompt_tokens.py $(ARGS)

lock: ## re-resolve the Python lock files from pyproject.toml (then review the diff)
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/pip install --quiet -e . && .lockvenv/bin/pip freeze --exclude-editable > requirements.lock.new
	rm -rf .lockvenv
	@echo "wrote requirements.lock.new; review and move it into place"

clean:
	rm -rf $(VENV) $(addsuffix /node_modules,$(NODE_DIRS)) .run
