# The two commands a newcomer needs (run as root; see README.md).
.PHONY: demo demo-down test
demo:
	python3 tools/demo.py up
demo-down:
	python3 tools/demo.py down
test:
	python3 -m pytest -q tests
