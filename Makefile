# The README's two commands:  `make bench` (the main job) and `make test`.
# Both set up their own environment first (scripts/env.sh).
SHELL := /bin/bash

.PHONY: bench test test-torch211 clean

bench:
	@PY=$$(scripts/env.sh) && $$PY -m benchmarks $(ARGS)

# test: the whole suite in .venv, then a fast subset under the oldest supported stack
# (.venv-torch211: torch 2.11 + Triton 3.6 + numpy 2.5, Python 3.12; docs/versions.md)
test:
	@PY=$$(scripts/env.sh) && scripts/test.sh $$PY $(ARGS)
	@$(MAKE) --no-print-directory test-torch211

test-torch211:
	@PY=$$(scripts/env.sh torch211) && { [ -z "$$PY" ] || scripts/test.sh --fast $$PY; }

clean:
	rm -rf .venv .venv-torch211 build *.egg-info .pytest_cache
