# plantwatch: the two commands an operator needs on a fresh machine are `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_SECONDS ?= 120
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo bench bench-full bench-skab bench-quality soak clean

# The venv is (re)built when pyproject.toml or the lock file changes.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## Full test suite (unit + integration against a real local broker + slow fault tests).
test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest $(PYTEST_ARGS)

## Everything except the slow soak/fault tests.
test-fast: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -m 'not slow' $(PYTEST_ARGS)

## Embedded broker, simulated plant, detector, trainer and live alerts.
demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/plantwatch demo --seconds $(DEMO_SECONDS)

## Benchmarks → bench/results.json (bench-full adds archive training at 5M readings: many minutes).
bench: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m bench.run_all

bench-full: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m bench.run_all --full

bench-skab: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m bench.skab

## Default settings on the development corpus (SKAB, SMD, unseen assets), 3 seeds, beside T²/T²+Q → bench/quality.json.
## QUALITY_ARGS=--quick: one seed on a subset.
QUALITY_ARGS ?=
bench-quality: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m bench.quality $(QUALITY_ARGS)

## Soak: detector, archiver and a retrain with hot swap every 5 minutes, for SOAK_MINUTES at a steady rate → bench/soak.json.
SOAK_MINUTES ?= 30
soak: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m bench.soak --minutes $(SOAK_MINUTES) --retrain-every-s 300

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
