# The two README commands. Each sets up .venv (torch==2.13.0 first), installs
# lmckit and makes sure Fashion-MNIST is present, then runs.
.PHONY: run test test-slow setup bench

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/lmckit reproduce $(ARGS)

test: setup
	.venv/bin/python -m pytest $(ARGS)

test-slow: setup
	.venv/bin/python -m pytest -m slow $(ARGS)
