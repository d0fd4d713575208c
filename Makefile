# The two README commands. Each sets up .venv (torch==2.13.0 first), installs
# lmckit and makes sure Fashion-MNIST is present, then runs.
.PHONY: run test test-slow setup bench lint docs

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

# The documentation site into build/site (mkdocs --strict: a broken link, a missing API reference or a
# docstring that does not parse fails the build), then a link check of every page and asset it wrote.
# Installs the `docs` extra first.
docs: setup
	.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,docs]'
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true .venv/bin/mkdocs build --strict
	.venv/bin/linkchecker --no-status --no-warnings build/site/index.html
