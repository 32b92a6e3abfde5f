# One command to set up and run the demo, one to run the tests.
GUEST_DIR ?= /var/lib/clearcri/guest

.PHONY: deps guest tools run demo test lint bench

deps:
	scripts/install-deps.sh

guest: deps
	clearcri guest build --guest-dir $(GUEST_DIR)

tools: deps
	scripts/build-cri-tools.sh

run:
	scripts/run-demo.sh

demo: guest
	clearcri demo --guest-dir $(GUEST_DIR)

lint:
	ruff check .
	ruff format --check .
	mypy

test: guest tools lint
	CLEARCRI_GUEST_DIR=$(GUEST_DIR) python3 -m pytest -v -rs tests/unit tests/integration

bench: guest
	clearcri bench boot --guest-dir $(GUEST_DIR)
