# One command to set up and run the demo, one to run the tests.
GUEST_DIR ?= /var/lib/clearcri/guest

.PHONY: deps guest tools run demo test lint bench conformance

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

# critest offline against clearcri; fails when a spec of tests/conformance/expected-pass.txt
# fails. CONFORMANCE_ARGS="--expected-only" runs just those specs (CI);
# "--runtime containerd" runs the containerd + runc baseline.
conformance: guest tools
	CLEARCRI_GUEST_DIR=$(GUEST_DIR) scripts/conformance.sh --check $(CONFORMANCE_ARGS)
