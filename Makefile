# The two commands a newcomer needs, run as root on a Debian host (see README.md). Both run the
# set-up first (tools/setup.sh): it installs what is missing and is quiet when nothing is.
.PHONY: setup demo demo-down test
# Test workers: the suite mostly waits on containers, servers and subprocesses.
PYTEST_WORKERS ?= 4

setup:
	@bash tools/setup.sh

demo: setup
	python3 tools/demo.py up

demo-down:
	python3 tools/demo.py down

test: setup
	python3 -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15 tests
