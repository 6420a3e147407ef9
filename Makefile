# The README's two commands:  `make bench` (the main job) and `make test`.
# Both set up their own environment first (scripts/env.sh).
SHELL := /bin/bash

.PHONY: bench test clean

bench:
	@PY=$$(scripts/env.sh) && $$PY -m benchmarks $(ARGS)

test:
	@PY=$$(scripts/env.sh) && scripts/test.sh $$PY $(ARGS)

clean:
	rm -rf .venv build *.egg-info .pytest_cache
