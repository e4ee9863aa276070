# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean venv airflow chromium

venv: $(STAMP) chromium

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	BLOGQA_CRAWL_ALLOW_PRIVATE=true $(BIN)/blogqa demo

# A local Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor) on the
# embedded database, with the DAG and the plugin; prints the UI address and login; Ctrl-C stops it.
airflow: $(STAMP)
	$(BIN)/blogqa airflow --port $(or $(PORT),8080)

# Debian's Chromium for the browser tests (tests/test_ui_view.py, tests/test_widget.py drive it
# with Playwright for Python, which never downloads a browser of its own). Installed when
# missing and we are root; otherwise those tests say how to install it and are skipped.
CHROMIUM := /usr/bin/chromium

chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "$(CHROMIUM) missing: sudo apt-get install chromium (for the browser tests)"; \
	  fi; \
	fi

# The suite runs on TEST_WORKERS pytest-xdist workers, a module at a time per worker (each
# worker has its own home and embedded PostgreSQL; the modules on the shared Airflow deployment
# stay together, see tests/conftest.py). Many tests wait on processes, servers and timers, so
# two workers keep both cores of a 2-core machine busy. The tests marked `timing` (request
# spacing measured at a server) then run on their own. TEST_WORKERS=0: all in one process.
TEST_WORKERS ?= 2

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope -m "not timing"; \
	  rest=$$?; $(BIN)/python -m pytest -m timing && exit $$rest

# Pipeline throughput sizes for `make bench` (DAG runs under Airflow's scheduler with
# LocalExecutor and CeleryExecutor, `blogqa run`, and the minimal program), the sizes of issue
# 11's targets; a shorter run: BENCH_N="100 500".
BENCH_N ?= 500 2000

bench: $(STAMP)
	$(BIN)/python bench/extraction_quality.py
	BLOGQA_CRAWL_ALLOW_PRIVATE=true $(BIN)/blogqa demo > /dev/null
	$(BIN)/python bench/api_latency.py
	$(BIN)/python bench/api_bench.py
	$(BIN)/python bench/stage_costs.py
	$(BIN)/python bench/pipeline_throughput.py --n $(BENCH_N)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .blogqa .pytest_cache .ruff_cache
