# The few targets a newcomer needs. `make demo` runs the platform; `make test` runs every test.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
NPM_STAMP := frontend/node_modules/.installed-$(shell cat frontend/package-lock.json 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: demo test test-python test-e2e lint bench install frontend chromium stop clean

install: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

frontend: $(NPM_STAMP)

$(NPM_STAMP): frontend/package.json
	@if [ -f frontend/package.json ]; then cd frontend && npm ci --no-audit --no-fund --loglevel=error && npm run build; fi
	@mkdir -p frontend/node_modules && rm -f frontend/node_modules/.installed-* && touch $@

# Debian's Chromium for the browser tests (never a downloaded browser build).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

demo: install frontend
	$(BIN)/python -m histoloop.launcher

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Runs against DATABASE_URL/REDIS_URL when set, else embedded PostgreSQL and Redis under var/.
test: install frontend chromium
	$(BIN)/python -m histoloop.embedded run -- $(MAKE) --no-print-directory test-python test-e2e

# DJANGO_SETTINGS_MODULE is given here because `embedded run` imports histoloop, whose Celery app
# sets it to histoloop.settings (DEBUG off) in the environment it hands on; pytest-django lets the
# environment win over pyproject's tests.settings.
TEST_ENV := FAST_PASSWORD_HASHING=1 DJANGO_SETTINGS_MODULE=tests.settings

test-python: lint
	$(TEST_ENV) $(BIN)/python -m pytest tests/unit tests/integration -p no:cacheprovider

# Browser tests in their own pytest process (an event loop left running breaks later tests).
test-e2e:
	$(TEST_ENV) DJANGO_ALLOW_ASYNC_UNSAFE=true $(BIN)/python -m pytest tests/e2e -p no:cacheprovider

bench: install
	$(BIN)/python -m histoloop.embedded run -- sh -c 'for b in tests/bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done'

stop:
	$(BIN)/python -m histoloop.embedded stop

clean: stop
	rm -rf var
