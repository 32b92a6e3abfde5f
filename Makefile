# One command to set up and run the demo, one to run the tests.
GUEST_DIR ?= /var/lib/clearcri/guest

.PHONY: deps guest tools peers kubernetes node-image run demo test lint bench conformance e2e e2e-helm \
	node-conformance

deps:
	scripts/install-deps.sh

guest: deps
	clearcri guest build --guest-dir $(GUEST_DIR)

tools: deps
	scripts/build-cri-tools.sh

kubernetes: deps
	scripts/build-kubernetes.sh

# The runtimes tests/bench/bench_peers.py compares clearcri with: containerd v2 with runc,
# and with gVisor (runsc), built from the Go module proxy (docs/benchmarks.md).
peers:
	scripts/build-peers.sh

run:
	scripts/run-demo.sh

# The Helm chart's node image, built with buildah (no Docker engine) with this guest and
# pushed to $(REGISTRY) as clearcri/clearcri-node:<version>-<digest> (docs/install.md).
# NODE_IMAGE_ARGS="--tag T", "--local-version LABEL" (a second release), "--verify".
REGISTRY ?= 127.0.0.1:5000
node-image: guest
	scripts/build-node-image.sh --registry $(REGISTRY) --guest-dir $(GUEST_DIR) $(NODE_IMAGE_ARGS)

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

# A real node: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubelet
# (v1.34, built from the Go module proxy) on this machine with clearcri as the node's
# runtime, driven with kubectl (docs/e2e.md). JUnit report in $(E2E_REPORT).
E2E_REPORT ?= e2e-report.xml
e2e: guest tools kubernetes
	CLEARCRI_GUEST_DIR=$(GUEST_DIR) CLEARCRI_E2E=1 python3 -m pytest -v -rs -p no:cacheprovider \
		tests/e2e --junitxml=$(E2E_REPORT) $(E2E_ARGS)

# The Helm chart on a real cluster (docs/e2e.md, "The chart on a cluster"): the node image
# built with buildah, two nodes on containerd switched to clearcri, upgrade, drain,
# uninstall. JUnit report in $(E2E_HELM_REPORT).
E2E_HELM_REPORT ?= e2e-helm-report.xml
e2e-helm: guest tools kubernetes
	CLEARCRI_GUEST_DIR=$(GUEST_DIR) CLEARCRI_E2E_HELM=1 python3 -m pytest -v -rs -p no:cacheprovider \
		tests/e2e_helm --junitxml=$(E2E_HELM_REPORT) $(E2E_HELM_ARGS)

# Upstream node conformance (test/e2e_node [NodeConformance], less what upstream CI skips)
# against the same kind of node; fails when a spec of
# tests/e2e/node-conformance-expected-pass.txt fails. NODE_CONFORMANCE_ARGS="--expected-only"
# runs just those specs; "--runtime containerd" runs the containerd + runc baseline.
node-conformance: guest tools
	CLEARCRI_GUEST_DIR=$(GUEST_DIR) scripts/node-conformance.sh --check $(NODE_CONFORMANCE_ARGS)
