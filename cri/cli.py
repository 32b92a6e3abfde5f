"""The `clearcri` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sandbox.guest import DEFAULT_GUEST_DIR, DEFAULT_KERNEL_FLAVOR, KERNEL_FLAVORS

DESCRIPTION = """\
clearcri: a Kubernetes container runtime (CRI v1) that runs every pod in its own
minimal QEMU virtual machine.

commands:
  serve         run the CRI daemon (kubelet, crictl and critest talk to its socket)
  supervise     keep the daemon running where systemd does not: detached, in a cgroup
                of its own, restarted when it exits (what clearcri.service does)
  guest build   build (or refresh) the guest kernel, initramfs and DAX OS image
  image push-busybox REF
                push a busybox image built from the host's busybox-static to a
                registry (offline demos and labs)
  demo          boot one pod VM, run a busybox container in it, print timings, remove it
  bench boot    benchmark VM boot against the bare-kernel floor, and host memory per VM
  bench container  a pod VM's container steps: create, start, output, exec, kill, stop
  bench density start idle pod VMs up to a count: start time, memory, CPU as they add up
  bench shapes  pods of five distinct limits: on a standby VM, sized at clone time, from
                a template of their own shape, or as a new shape; their start and
                their first container's first output, against the default shape's clone
  bench overhead
                what a pod VM costs its pod cgroup beyond the guest's RAM (QEMU's
                own memory), idle and with the guest full
"""


def _progress(line: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {line}", file=sys.stderr, flush=True)


def cmd_guest_build(args: argparse.Namespace) -> int:
    from guestbuild.builder import build_guest
    from sandbox.guest import GuestError

    try:
        assets = build_guest(
            Path(args.guest_dir), progress=_progress, force=args.force, kernel=args.kernel
        )
    except GuestError as exc:
        print(f"clearcri: guest build failed: {exc}", file=sys.stderr)
        return 1
    print(f"kernel   {assets.kernel} ({assets.kernel_version})")
    print(f"initrd   {assets.initrd}")
    print(f"os image {assets.os_image} ({assets.os_image.stat().st_size / 2**20:.1f} MiB)")
    print(f"vmm      {assets.vmm}")
    print(f"version  {assets.version}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cri.config import ConfigError, load_config
    from cri.server import DaemonError, serve

    try:
        config = load_config(Path(args.config))
    except ConfigError as exc:
        print(f"clearcri: config error: {exc}", file=sys.stderr)
        return 2
    if args.socket:
        config.daemon.socket = Path(args.socket)
    try:
        return asyncio.run(serve(config))
    except DaemonError as exc:
        print(f"clearcri: {exc}", file=sys.stderr)
        return 1


def cmd_supervise(args: argparse.Namespace) -> int:
    from deploy.supervisor import RestartPolicy, Settings, supervise

    if args.log == "-" and not args.foreground:
        print("clearcri supervise: --log - needs --foreground", file=sys.stderr)
        return 2
    settings = Settings(
        config=Path(args.config),
        daemon=Path(args.daemon),
        pidfile=Path(args.pidfile),
        log=Path(args.log) if args.log else None,
        cgroup=args.cgroup,
        init_namespaces=args.init_namespaces,
        foreground=args.foreground,
        stop_timeout=args.stop_timeout,
        policy=RestartPolicy(restart_sec=args.restart_sec),
    )
    return supervise(settings)


def cmd_image_push_busybox(args: argparse.Namespace) -> int:
    from cri.images.local import push_tree
    from cri.images.rootfs import make_busybox_tree

    with tempfile.TemporaryDirectory(prefix="clearcri-image-") as work:
        tree = make_busybox_tree(Path(work) / "root")
        digest = asyncio.run(push_tree(tree, args.reference))
    print(f"{args.reference}@{digest}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from demo import run_demo

    return asyncio.run(run_demo(Path(args.guest_dir), Path(args.run_root)))


@contextlib.contextmanager
def _bench_work_dir(given: str) -> Iterator[Path]:
    """The benchmark's scratch directory: ``given`` (kept), or a new temporary one that
    is removed afterwards (mounts below it detached first)."""
    if given:
        yield Path(given)
        return
    work = Path(tempfile.mkdtemp(prefix="clearcri-bench-"))
    try:
        yield work
    finally:
        from sandbox.mounts import remove_tree

        remove_tree(work)


def _plot_path(given: str) -> Path | None:
    """A benchmark's ``--plot PATH``, checked before the run: matplotlib must be there."""
    if not given:
        return None
    from bench.plots import PlotError, require_matplotlib

    try:
        require_matplotlib()
    except PlotError as exc:
        raise SystemExit(f"clearcri: {exc}") from None
    return Path(given)


def cmd_bench_boot(args: argparse.Namespace) -> int:
    from bench.boot import run_boot_bench

    plot = _plot_path(args.plot)
    with _bench_work_dir(args.work_dir) as work:
        return asyncio.run(
            run_boot_bench(
                guest_dir=Path(args.guest_dir),
                runs=args.runs,
                memory_vms=args.memory_vms,
                work_dir=work,
                plot=plot,
            )
        )


def cmd_bench_container(args: argparse.Namespace) -> int:
    from bench.container import run_container_bench

    with _bench_work_dir(args.work_dir) as work:
        return asyncio.run(
            run_container_bench(
                guest_dir=Path(args.guest_dir),
                runs=args.runs,
                work_dir=work,
                standby=args.standby,
                tb_sizes=tuple(int(size) for size in args.tb_sizes.split(",") if size),
            )
        )


def cmd_bench_density(args: argparse.Namespace) -> int:
    from bench.density import run_density_bench

    plot = _plot_path(args.plot)
    with _bench_work_dir(args.work_dir) as work:
        return asyncio.run(
            run_density_bench(
                guest_dir=Path(args.guest_dir),
                pods=args.pods,
                step=args.step,
                work_dir=work,
                plot=plot,
                qemu=args.qemu,
                jit_flush_idle_s=args.jit_flush_idle,
                starts_csv=Path(args.starts_csv) if args.starts_csv else None,
            )
        )


def cmd_bench_shapes(args: argparse.Namespace) -> int:
    from bench.shapes import run_shapes_bench

    with _bench_work_dir(args.work_dir) as work:
        return asyncio.run(
            run_shapes_bench(guest_dir=Path(args.guest_dir), rounds=args.rounds, work_dir=work)
        )


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    from bench.overhead import run_overhead_bench

    with _bench_work_dir(args.work_dir) as work:
        return asyncio.run(
            run_overhead_bench(
                guest_dir=Path(args.guest_dir),
                sizes=[int(s) for s in args.sizes.split(",")],
                work_dir=work,
            )
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearcri",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the CRI daemon")
    serve.add_argument(
        "--config",
        default="/etc/clearcri/config.toml",
        help="config file (TOML; a missing default file means all defaults)",
    )
    serve.add_argument("--socket", default="", help="override daemon.socket")
    serve.set_defaults(func=cmd_serve)

    supervise = sub.add_parser(
        "supervise",
        help="keep the daemon running without systemd (detached, own cgroup, restarts)",
    )
    supervise.add_argument(
        "--config", default="/etc/clearcri/config.toml", help="the daemon's config file"
    )
    supervise.add_argument(
        "--daemon",
        default="/opt/clearcri/venv/bin/clearcri",
        help="the clearcri to run `serve` with (the venv symlink, so upgrades take effect)",
    )
    supervise.add_argument(
        "--pidfile",
        default="/run/clearcri/supervisor.pid",
        help="the supervisor's pidfile, locked while it runs (one supervisor per pidfile)",
    )
    supervise.add_argument(
        "--log",
        default="",
        help="the daemon's output (default <daemon.log_dir>/daemon.log; - with --foreground: "
        "stdout/stderr as they are)",
    )
    supervise.add_argument(
        "--cgroup",
        default="clearcri.service",
        help="cgroup made below the root of every hierarchy for the supervisor and the "
        "daemon ('' stays in the current cgroups)",
    )
    supervise.add_argument(
        "--init-namespaces",
        action="store_true",
        help="enter PID 1's cgroup, IPC, UTS and network namespaces first",
    )
    supervise.add_argument(
        "--foreground", action="store_true", help="do not detach (under another init)"
    )
    supervise.add_argument(
        "--restart-sec", type=float, default=2.0, help="wait before restarting the daemon"
    )
    supervise.add_argument(
        "--stop-timeout",
        type=float,
        default=90.0,
        help="seconds from SIGTERM to SIGKILL when stopping the daemon",
    )
    supervise.set_defaults(func=cmd_supervise)

    guest = sub.add_parser("guest", help="guest assets (kernel, initramfs, OS image)")
    guest_sub = guest.add_subparsers(dest="guest_command", required=True)
    build = guest_sub.add_parser(
        "build", help="fetch Debian packages and build the guest assets (idempotent, cached)"
    )
    build.add_argument("--guest-dir", default=str(DEFAULT_GUEST_DIR), help="where assets live")
    build.add_argument("--force", action="store_true", help="rebuild everything")
    build.add_argument(
        "--kernel",
        choices=KERNEL_FLAVORS,
        default=DEFAULT_KERNEL_FLAVOR,
        help="clearcri: our own kernel built from linux-source-6.1 (default; pods mount "
        "host paths over 9p); debian: Debian's cloud kernel (no host-path mounts)",
    )
    build.set_defaults(func=cmd_guest_build)

    image = sub.add_parser("image", help="image helpers")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    push_bb = image_sub.add_parser(
        "push-busybox", help="push a busybox image made from the host's busybox-static"
    )
    push_bb.add_argument("reference", help="e.g. 127.0.0.1:5000/demo/busybox:1")
    push_bb.set_defaults(func=cmd_image_push_busybox)

    demo = sub.add_parser("demo", help="boot one pod VM and run a busybox container in it")
    demo.add_argument("--guest-dir", default=str(DEFAULT_GUEST_DIR))
    demo.add_argument("--run-root", default=f"/run/clearcri/demo-{uuid.uuid4().hex[:8]}")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    boot = bench_sub.add_parser(
        "boot", help="boot time (phases, vs bare-kernel floor) and memory per VM (DAX vs blk)"
    )
    boot.add_argument("--guest-dir", default=str(DEFAULT_GUEST_DIR))
    boot.add_argument("--runs", type=int, default=5, help="boots per configuration")
    boot.add_argument("--memory-vms", type=int, default=8, help="VMs for the memory figure")
    boot.add_argument("--work-dir", default="", help="scratch dir (default: a new temp dir)")
    boot.add_argument(
        "--plot",
        default="",
        metavar="PATH",
        help="also write the boot phases of each kind of start as a PNG (needs matplotlib)",
    )
    boot.set_defaults(func=cmd_bench_boot)
    container = bench_sub.add_parser(
        "container",
        help="a pod VM's container steps: create, start, first output, exec, kill, stop",
    )
    container.add_argument("--guest-dir", default=str(DEFAULT_GUEST_DIR))
    container.add_argument("--runs", type=int, default=5, help="pod VMs to time")
    container.add_argument("--work-dir", default="", help="scratch dir (default: a new temp dir)")
    container.add_argument(
        "--standby",
        action="store_true",
        help="every run also a pod that takes over a standby VM, side by side",
    )
    container.add_argument(
        "--tb-sizes",
        default="",
        metavar="MIB,MIB",
        help="a column per TCG translation-cache size (vm.tcg_tb_size_mib), each its own "
        "node; with --standby its pods take standby VMs",
    )
    container.set_defaults(func=cmd_bench_container)
    density = bench_sub.add_parser(
        "density", help="idle pod VMs on one node: start time, memory and CPU as they add up"
    )
    density.add_argument("--guest-dir", default=str(DEFAULT_GUEST_DIR))
    density.add_argument("--pods", type=int, default=200, help="pods to start at most")
    density.add_argument("--step", type=int, default=25, help="print figures every N pods")
    density.add_argument("--work-dir", default="", help="scratch dir (default: a new temp dir)")
    density.add_argument(
        "--qemu",
        default="",
        help="the VMM ([vm] qemu; default: the guest directory's own build, "
        "qemu-system-x86_64 for the host's)",
    )
    density.add_argument(
        "--starts-csv",
        default="",
        metavar="FILE",
        help="write every start's phases (spawn, restore, agent, hot-plug) to FILE, a row per pod",
    )
    density.add_argument(
        "--jit-flush-idle",
        type=float,
        default=None,
        metavar="S",
        help="under TCG, flush an idle pod VM's translated code after S seconds idle and "
        "measure each step once every pod's was ([vm] jit_flush_idle_s; default: the "
        "daemon's; 0: never)",
    )
    density.add_argument(
        "--plot",
        default="",
        metavar="PATH",
        help="also write start time and memory per pod against the pod count as a PNG "
        "(needs matplotlib)",
    )
    density.set_defaults(func=cmd_bench_density)
    shapes = bench_sub.add_parser(
        "shapes",
        help="pods of five distinct limits (standby, hot-plugged, own template, new shape): "
        "start and first container's output against the default shape's clone",
    )
    shapes.add_argument("--guest-dir", default=str(DEFAULT_GUEST_DIR))
    shapes.add_argument("--rounds", type=int, default=3, help="rounds of every pod")
    shapes.add_argument("--work-dir", default="", help="scratch dir (default: a new temp dir)")
    shapes.set_defaults(func=cmd_bench_shapes)
    overhead = bench_sub.add_parser(
        "overhead", help="QEMU's own memory: what a pod VM costs its cgroup beyond guest RAM"
    )
    overhead.add_argument("--guest-dir", default=str(DEFAULT_GUEST_DIR))
    overhead.add_argument("--sizes", default="256,384,640", help="VM sizes in MiB, comma-separated")
    overhead.add_argument("--work-dir", default="", help="scratch dir (default: a new temp dir)")
    overhead.set_defaults(func=cmd_bench_overhead)

    from deploy.node_install import register_node_commands

    register_node_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # one line per request is too much at INFO; failures still show
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
