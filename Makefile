# The two commands from the README. Everything else is in scripts/dev.
.PHONY: run test lint bench

run:
	scripts/dev run

test:
	scripts/dev test $(ARGS)

lint:  # also run by `make test`
	scripts/dev setup && .venv/bin/lint-imports && .venv/bin/ruff check . && .venv/bin/mypy

bench:
	scripts/dev setup && for b in bench/bench_*.py; do .venv/bin/python $$b || exit 1; done
