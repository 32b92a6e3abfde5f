"""Upstream node conformance (k8s.io/kubernetes test/e2e_node) against this machine's node.

One command builds what it needs, runs the suite and cleans up after itself:

1. builds kubelet, the control plane, kubectl, ``e2e_node.test``, agnhost and the ginkgo
   runner of the same tree once (``scripts/build-kubernetes.sh``, cached);
2. starts Debian's ``docker-registry`` on 127.0.0.1 and pushes the images of
   ``tests/e2e/node_images.py`` under their upstream paths;
3. starts the real-node harness (``tests/e2e/cluster.py``: etcd, kube-apiserver,
   controller-manager, scheduler, kubelet) with clearcri, or Debian's containerd + runc as
   the baseline, as the node's runtime, registry.k8s.io, gcr.io and k8s.gcr.io mirrored to
   that registry;
4. runs the suite's ``[NodeConformance]`` specs less what upstream CI skips (``[Serial]``,
   ``[Slow]``, ``[Flaky]``, ``[Feature:…]``) against that node, ``--start-services=false``
   (the suite uses the running node; it finds kubelet's configuration through /configz),
   with ``--procs`` ginkgo processes, writing ``report.json``, ``junit.xml``,
   ``suite.log`` and ``summary.txt`` (``N passed, M failed, K skipped``);
5. stops every process it started by PID and removes what the node made.

    python3 -m tests.e2e.node_conformance [--runtime clearcri|containerd] [--procs N]
        [--expected-only | --ci | --specs FILE] [--focus REGEX] [--skip REGEX] [--report-dir DIR]
        [--check [--update]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conformance import check
from tests.conformance.run import (
    LOCK_FILE,
    MIRRORED,
    LocalRegistry,
    log,
    stop_on_signal,
    unmount_under,
    wait_for_lock,
)
from tests.e2e import node_images
from tests.e2e.cluster import DEFAULT_BINDIR, REPO, Cluster, ClusterConfig

SUITE = "E2eNode Suite"
FOCUS = r"\[NodeConformance\]"
# what upstream's node conformance jobs skip
UPSTREAM_SKIP = r"\[Serial\]|\[Slow\]|\[Flaky\]|\[Feature:"
EXPECTED_PASS = Path(__file__).resolve().parent / "node-conformance-expected-pass.txt"
# the part of the expected-pass list CI runs (the whole list takes too long beside the rest)
CI_SPECS = Path(__file__).resolve().parent / "node-conformance-ci.txt"
# Each runtime's node has bridges and subnets of its own (not the e2e suite's), so a
# clearcri run and the containerd baseline can run side by side.
NETWORKS = {
    "clearcri": ("ccnc", "10.231.252.1/24", "10.231.253.0/24"),
    "containerd": ("ccnd", "10.231.254.1/24", "10.231.255.0/24"),
}
TARGETS = (
    "kubelet kube-apiserver kube-controller-manager kube-scheduler kubectl "
    "e2e_node.test agnhost ginkgo"
)


def read_json_report(path: Path) -> list[check.SpecResult]:
    """The It specs of a ginkgo JSON report (set-up nodes left out); a spec's name is
    its full text, the string ginkgo's --focus matches (spaces kept as they are)."""
    suites = json.loads(path.read_text())
    results = []
    for suite in suites:
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            name = " ".join([*(spec.get("ContainerHierarchyTexts") or []), spec["LeafNodeText"]])
            state = spec.get("State", "")
            outcome = {"passed": "passed", "skipped": "skipped", "pending": "skipped"}.get(
                state, "failed"
            )
            message = ""
            if outcome == "failed":
                failure = spec.get("Failure") or {}
                text = str(failure.get("Message") or state).strip()
                message = text.splitlines()[0] if text else state
            elif outcome == "skipped":
                failure = spec.get("Failure") or {}
                message = str(failure.get("Message") or "").strip().split("\n")[0]
                if not message:
                    continue  # not selected by focus and skip: no part of the run
            seconds = float(spec.get("RunTime", 0)) / 1e9
            results.append(check.SpecResult(name, outcome, seconds, message))
    return results


def build_tools() -> None:
    subprocess.run(
        [str(REPO / "scripts" / "build-kubernetes.sh"), str(DEFAULT_BINDIR)],
        check=True,
        env=dict(os.environ, KUBERNETES_TARGETS=TARGETS),
    )


def suite_argv(args: argparse.Namespace, cluster: Cluster, report_dir: Path) -> list[str]:
    focus = args.focus or FOCUS
    if args.specs is not None:
        focus = check.focus_regex(check.read_expected(args.specs), suite=SUITE)
    skip = "|".join([UPSTREAM_SKIP, *args.skip])
    endpoint = f"unix://{cluster.runtime_socket}"
    return [
        str(DEFAULT_BINDIR / "ginkgo"),
        "run",
        f"--procs={args.procs}",
        f"--timeout={args.timeout}",
        f"--focus={focus}",
        f"--skip={skip}",
        f"--flake-attempts={args.flake_attempts}",
        "--no-color",
        "-v",
        f"--output-dir={report_dir}",
        "--json-report=report.json",
        "--junit-report=junit.xml",
        str(DEFAULT_BINDIR / "e2e_node.test"),
        "--",
        "--start-services=false",
        "--prepull-images=false",
        f"--host={cluster.apiserver_url}",
        f"--bearer-token={cluster.admin_token}",
        f"--kubectl-path={DEFAULT_BINDIR / 'kubectl'}",
        f"--node-name={cluster.config.node_name}",
        f"--container-runtime-endpoint={endpoint}",
        f"--image-service-endpoint={endpoint}",
        f"--report-dir={report_dir / 'framework'}",
        "--dns-domain=cluster.local",
    ]


def run_suite(args: argparse.Namespace, cluster: Cluster, report_dir: Path) -> float:
    argv = suite_argv(args, cluster, report_dir)
    (report_dir / "framework").mkdir(exist_ok=True)
    log(f"running node conformance ({args.procs} processes); output in {report_dir}/suite.log")
    started = time.monotonic()
    with (report_dir / "suite.log").open("wb") as out:
        # the suite writes scratch files (kubelet drop-in dir) into its working directory
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=report_dir / "framework")
    return time.monotonic() - started


def write_summary(report_dir: Path, runtime: str, seconds: float, total: float) -> str:
    report = report_dir / "report.json"
    if not report.exists():
        raise SystemExit(f"the suite wrote no report; see {report_dir / 'suite.log'}")
    results = read_json_report(report)
    if not results:
        raise SystemExit(f"the suite ran no spec; see {report_dir / 'suite.log'}")
    return check.write_results(report_dir, runtime, results, seconds, total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run upstream node conformance offline.")
    parser.add_argument("--runtime", choices=("clearcri", "containerd"), default="clearcri")
    parser.add_argument("--report-dir", type=Path, help="default: build/node-conformance/<rt>")
    parser.add_argument("--focus", default="", help=f"ginkgo focus regex (default {FOCUS})")
    parser.add_argument("--skip", action="append", default=[], help="more ginkgo skip regexes")
    parser.add_argument(
        "--expected-only", action="store_true", help=f"run only the specs of {EXPECTED_PASS.name}"
    )
    parser.add_argument(
        "--ci", action="store_true", help=f"run only the specs of {CI_SPECS.name} (CI)"
    )
    parser.add_argument(
        "--specs", type=Path, help="run only the specs named in FILE (one full text a line)"
    )
    parser.add_argument("--procs", type=int, default=2, help="parallel ginkgo processes")
    parser.add_argument("--flake-attempts", type=int, default=1)
    parser.add_argument("--timeout", default="4h", help="ginkgo suite timeout")
    parser.add_argument("--check", action="store_true", help="fail on an expected-pass miss")
    parser.add_argument("--update", action="store_true", help="add passing specs to the list")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.ci:
        args.specs = CI_SPECS
    elif args.expected_only:
        args.specs = EXPECTED_PASS
    if os.geteuid() != 0:
        raise SystemExit("a node needs root (cgroups, network namespaces, bridges)")
    report_dir = (args.report_dir or REPO / "build" / "node-conformance" / args.runtime).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("report.json", "junit.xml", "summary.txt", "results.json"):
        (report_dir / stale).unlink(missing_ok=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_on_signal)
    # one run per runtime at a time: its node's bridges and subnets are fixed
    wait_for_lock(
        f"{LOCK_FILE}.node-{args.runtime}",
        f"another node conformance run on {args.runtime} is going on; waiting for it",
    )
    started = time.monotonic()
    build_tools()
    work = Path(tempfile.mkdtemp(prefix="ccnode-", dir="/tmp"))
    seconds = 0.0
    try:
        registry = LocalRegistry(work)
        cluster: Cluster | None = None
        try:
            log(f"pushing the node conformance images to {registry.host}")
            node_images.build_and_push(registry.host)
            prefix, node_address, pod_subnet = NETWORKS[args.runtime]
            cluster = Cluster(
                ClusterConfig(
                    work=work / "node",
                    node_name=f"{prefix}-node",
                    node_address=node_address,
                    pod_subnet=pod_subnet,
                    bridge_prefix=prefix,
                    runtime=args.runtime,
                    registry=registry.host,
                    mirrored=MIRRORED,
                )
            )
            log(f"starting the node ({args.runtime}); logs in {work / 'node' / 'logs'}")
            cluster.start()
            seconds = run_suite(args, cluster, report_dir)
        finally:
            if cluster is not None:
                cluster.stop()
                with contextlib.suppress(OSError):
                    shutil.copytree(cluster.logs, report_dir / "node-logs", dirs_exist_ok=True)
            registry.stop()
    finally:
        unmount_under(work)
        if args.keep:
            log(f"kept work directory {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - started
    line = write_summary(report_dir, args.runtime, seconds, total)
    print(
        f"node conformance on {args.runtime}: {line} "
        f"(suite {seconds / 60:.1f} min, total {total / 60:.1f} min)"
    )
    if args.check and args.runtime == "clearcri":
        results = [
            check.SpecResult(**r.__dict__) for r in read_json_report(report_dir / "report.json")
        ]
        return check.compare(results, EXPECTED_PASS, args.update, args.specs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
