"""`clearcri supervise` with a stand-in daemon (a shell script): detaching, the pidfile
and its lock, restarts and their rate cap, SIGHUP, SIGTERM to the daemon alone, the log.

The supervisor's own cgroup, with the real daemon, the real install and a pod VM, is in
tests/integration/test_supervisor.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cri.cli import build_parser
from deploy.supervisor import (
    DEFAULT_CGROUP,
    DaemonLog,
    RestartPolicy,
    cgroup_name,
    daemon_env,
    daemon_pid,
    enter_cgroup,
    is_supervisor,
    log_dir_of,
    supervisor_pid,
    wait_gone,
)
from sandbox.procfs import pid_alive

REPO = Path(__file__).resolve().parents[2]

#: Stands in for `clearcri serve`: records its PID and arguments, starts a child of its
#: own (as the daemon starts QEMU), and stops on SIGTERM unless told to ignore it.
FAKE_DAEMON = """#!/bin/sh
dir=$(dirname "$0")
echo "$$ $*" >> "$dir/starts"
[ -e "$dir/exit-at-once" ] && exit 3
sleep 300 &
echo $! >> "$dir/children"
if [ -e "$dir/ignore-term" ]; then
    trap '' TERM
else
    trap 'echo "$$ TERM" >> "$dir/signals"; exit 0' TERM
fi
echo "daemon $$ running"
while :; do sleep 0.1; done
"""


# -- pieces --------------------------------------------------------------------------


def test_restart_policy_waits_restart_sec_and_holds_off_a_crash_loop() -> None:
    policy = RestartPolicy(restart_sec=2, burst=5, interval=10, hold_off=30)
    for t in (0.0, 2.0, 4.0, 6.0):
        policy.started(t)
    assert policy.delay(6.5) == (2, "")
    policy.started(8.0)
    delay, why = policy.delay(8.1)
    assert delay == 30
    assert "5 times within 10 s" in why and "holding off 30 s" in why
    # Starts longer ago than the interval do not count.
    assert policy.delay(16.5) == (2, "")


def test_cgroup_name_of_the_node_and_of_other_prefixes(tmp_path: Path) -> None:
    assert cgroup_name(Path("/")) == DEFAULT_CGROUP == "clearcri.service"
    mine = cgroup_name(tmp_path)
    assert mine == cgroup_name(tmp_path) and mine.endswith(".service")
    assert mine != cgroup_name(tmp_path / "other") and "/" not in mine


def test_enter_cgroup_takes_one_path_component() -> None:
    from deploy.supervisor import SupervisorError

    for bad in ("", "a/b", ".."):
        with pytest.raises(SupervisorError):
            enter_cgroup(bad)


def test_log_dir_comes_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nlog_dir = "/x/log"\n')
    assert log_dir_of(config) == Path("/x/log")
    config.write_text("[daemon]\n")
    assert log_dir_of(config) == Path("/var/log/clearcri")
    assert log_dir_of(tmp_path / "missing.toml") == Path("/var/log/clearcri")


def test_the_daemon_gets_a_clean_environment() -> None:
    env = daemon_env({"PATH": "/odd", "LANG": "C.UTF-8", "PYTHONPATH": "/w.whl", "K": "v"})
    assert env == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }


def test_log_is_copied_aside_and_truncated_past_its_size(tmp_path: Path) -> None:
    path = tmp_path / "log/daemon.log"
    log = DaemonLog(path, max_bytes=1000, keep=2)
    try:
        os.write(log.fd, b"a" * 1500)
        assert log.rotate_if_needed()
        assert (tmp_path / "log/daemon.log.1").read_bytes() == b"a" * 1500
        # A writer holding the same description (the daemon) goes on at the new end.
        os.write(log.fd, b"b" * 1500)
        assert log.rotate_if_needed()
        assert (tmp_path / "log/daemon.log.2").read_bytes() == b"a" * 1500
        newer = (tmp_path / "log/daemon.log.1").read_bytes()
        assert newer.endswith(b"\n" + b"b" * 1500) and b"a" * 1500 not in newer
        os.write(log.fd, b"c" * 1500)
        assert log.rotate_if_needed()
        assert b"b" * 1500 in (tmp_path / "log/daemon.log.2").read_bytes()
        assert not (tmp_path / "log/daemon.log.3").exists()
        # What is left is the note of the rotation alone.
        assert path.read_bytes().count(b"\n") == 1 and b"rotated" in path.read_bytes()
        assert not log.rotate_if_needed()
    finally:
        log.close()


def test_cli_parses_supervise(tmp_path: Path) -> None:
    args = build_parser().parse_args(["supervise"])
    assert (args.config, args.daemon, args.pidfile, args.cgroup) == (
        "/etc/clearcri/config.toml",
        "/opt/clearcri/venv/bin/clearcri",
        "/run/clearcri/supervisor.pid",
        "clearcri.service",
    )
    args = build_parser().parse_args(["supervise", "--log", "-"])
    assert args.func(args) == 2  # - (stderr as it is) only in the foreground


# -- a detached supervisor with a stand-in daemon --------------------------------------


class Run:
    """One supervisor started the way `clearcri node install` starts it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemon = root / "bin/clearcri"
        self.daemon.parent.mkdir()
        self.daemon.write_text(FAKE_DAEMON)
        self.daemon.chmod(0o755)
        self.pidfile = root / "run/supervisor.pid"
        self.log = root / "log/daemon.log"

    def argv(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cri.cli",
            "supervise",
            "--config",
            str(self.root / "config.toml"),
            "--daemon",
            str(self.daemon),
            "--pidfile",
            str(self.pidfile),
            "--log",
            str(self.log),
            "--cgroup",
            "",
            "--restart-sec",
            "0.2",
            *extra,
        ]

    def start(self, *extra: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(
            self.argv(*extra), capture_output=True, text=True, env=env, cwd="/", timeout=60
        )

    def lines(self, name: str) -> list[str]:
        path = self.root / "bin" / name
        return path.read_text().splitlines() if path.exists() else []

    def starts(self) -> list[int]:
        return [int(line.split()[0]) for line in self.lines("starts")]

    def children(self) -> list[int]:
        return [int(line) for line in self.lines("children")]


def wait_for(what: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    r = Run(tmp_path)
    try:
        yield r
    finally:
        # Whatever a failed test left: the supervisor, its daemons, their children.
        pid = supervisor_pid(r.pidfile)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for leftover in r.starts() + r.children():
            if pid_alive(leftover):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leftover, signal.SIGKILL)


def test_supervisor_detaches_restarts_and_stops_the_daemon_alone(run: Run) -> None:
    proc = run.start()
    assert proc.returncode == 0, proc.stderr
    assert f"pidfile {run.pidfile}" in proc.stdout and f"log {run.log}" in proc.stdout
    pid = supervisor_pid(run.pidfile)
    assert pid is not None and is_supervisor(pid, run.pidfile)
    # Detached: not our child; in a new session it does not lead (no controlling
    # terminal can come back).
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(stat[1]) != os.getpid()
    assert os.getsid(pid) not in (os.getsid(0), pid)
    wait_for(lambda: run.starts())
    first = run.starts()[0]
    assert daemon_pid(pid) == first
    assert run.lines("starts")[0].split()[1:] == [
        "serve",
        "--config",
        str(run.root / "config.toml"),
    ]

    # One supervisor per pidfile.
    second = run.start()
    assert second.returncode == 1
    assert f"a supervisor already runs for {run.pidfile} (pid {pid})" in second.stderr

    # The daemon dies: started again after RestartSec.
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(run.starts()) == 2)
    restarted = run.starts()[1]
    assert restarted != first and daemon_pid(pid) == restarted

    # SIGHUP: SIGTERM to the daemon, a new one at once.
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: len(run.starts()) == 3)
    assert run.lines("signals") == [f"{restarted} TERM"]

    # SIGTERM: the daemon alone gets SIGTERM; what it started keeps running.
    newest = run.starts()[2]
    os.kill(pid, signal.SIGTERM)
    assert wait_gone([pid, newest], 20)
    assert run.lines("signals")[-1] == f"{newest} TERM"
    assert not run.pidfile.exists()
    assert supervisor_pid(run.pidfile) is None
    children = run.children()
    assert len(children) == 3 and all(pid_alive(c) for c in children)
    log = run.log.read_text()
    assert "was killed by SIGKILL" in log and "starting it again in 0.2 s" in log
    assert "restart requested (SIGHUP)" in log and "stopping (SIGTERM)" in log
    assert f"daemon {newest} running" in log  # the daemon's own output


def test_a_crash_loop_is_held_off_and_said_so(run: Run) -> None:
    (run.root / "bin/exit-at-once").touch()
    assert run.start().returncode == 0
    pid = supervisor_pid(run.pidfile)
    assert pid is not None
    wait_for(lambda: "holding off 30 s" in run.log.read_text())
    assert len(run.starts()) == 5
    assert "exited with status 3" in run.log.read_text()
    os.kill(pid, signal.SIGTERM)  # stops at once, with no daemon to stop
    assert wait_gone([pid], 10)
    assert len(run.starts()) == 5


def test_a_daemon_that_ignores_sigterm_gets_sigkill_after_the_stop_timeout(run: Run) -> None:
    (run.root / "bin/ignore-term").touch()
    assert run.start("--stop-timeout", "0.5").returncode == 0
    pid = supervisor_pid(run.pidfile)
    assert pid is not None
    wait_for(lambda: run.starts())
    os.kill(pid, signal.SIGTERM)
    assert wait_gone([pid, *run.starts()], 20)
    assert "did not stop within 0.5 s: SIGKILL to it alone" in run.log.read_text()


def test_a_daemon_it_did_not_start_is_stopped_first(run: Run) -> None:
    """Its supervisor was killed, or it was started by hand: it holds the daemon's lock,
    so a daemon started beside it would refuse to run."""
    (run.root / "config.toml").write_text(f'[daemon]\nrun_dir = "{run.root / "drun"}"\n')
    (run.root / "drun").mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(300)\n",
            str(run.root / "drun/clearcri.lock"),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        assert run.start().returncode == 0
        assert holder.wait(20) == -signal.SIGTERM
        wait_for(lambda: run.starts())
        log = run.log.read_text()
        assert f"did not start holds {run.root / 'drun/clearcri.lock'} (pid {holder.pid})" in log
    finally:
        holder.kill()
        holder.wait()
    pid = supervisor_pid(run.pidfile)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert wait_gone([pid], 20)


def test_a_missing_daemon_is_an_error_at_once(run: Run) -> None:
    run.daemon.unlink()
    proc = run.start()
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    assert not run.pidfile.exists()


def test_a_stale_pidfile_is_not_a_supervisor(run: Run) -> None:
    run.pidfile.parent.mkdir()
    run.pidfile.write_text(f"{os.getpid()}\n")  # a live process, but not holding the lock
    assert supervisor_pid(run.pidfile) is None
    proc = run.start()
    assert proc.returncode == 0, proc.stderr
    pid = supervisor_pid(run.pidfile)
    assert pid is not None and pid != os.getpid()
    os.kill(pid, signal.SIGTERM)
    assert wait_gone([pid], 20)
    assert not run.pidfile.exists()
