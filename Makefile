# The two README commands. Each sets up .venv (torch==2.13.0 first), installs
# lmckit and makes sure Fashion-MNIST is present, then runs.
.PHONY: run test test-slow setup bench lint

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/lmckit reproduce --jobs auto $(ARGS)

test: setup
	.venv/bin/python -m pytest $(ARGS)

test-slow: setup
	.venv/bin/python -m pytest -m slow $(ARGS)

# ruff (lint + format check, line length 120: pyproject.toml [tool.ruff]); installs the `lint` extra first.
LINT_PATHS = src tests benchmarks scripts
lint: setup
	.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,lint]'
	.venv/bin/ruff check $(LINT_PATHS)
	.venv/bin/ruff format --check $(LINT_PATHS)
