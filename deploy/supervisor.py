"""``clearcri supervise``: keep the daemon running on a node without systemd.

What ``clearcri.service`` gives the daemon under systemd, for nodes where no systemd
runs (an init that only runs scripts, a container host, the Helm chart's install on
such a node)::

    detached         double fork and a new session; stdin /dev/null, cwd /, umask 022
    own cgroup       /<name> (default clearcri.service) in every hierarchy: each v1
                     controller and the v2 one; whatever started it (a DaemonSet
                     container, whose cgroup is killed with its pod) no longer holds it
    one per pidfile  an exclusive flock on the pidfile (default
                     /run/clearcri/supervisor.pid), held for the supervisor's life
    Restart=always   the daemon is started again RestartSec (2 s) after it exits; after
                     5 starts within 10 s it is held off 30 s, and the log says so
    KillMode=process SIGTERM to the supervisor: SIGTERM to the daemon's own PID only (pod
                     VMs keep running; the next daemon re-adopts them), SIGKILL to that
                     PID after the stop timeout; then the supervisor leaves and removes
                     its cgroup, removes its pidfile and exits
    restart          SIGHUP: the daemon is stopped the same way and started again at
                     once, through the ``venv`` symlink (a switched release takes effect)
    takeover         a daemon it did not start that holds the daemon's lock (its own
                     supervisor was killed, or it was started by hand) is stopped the
                     same way before the first start
    output           the daemon's stdout and stderr, and the supervisor's own lines, in
                     <daemon.log_dir>/daemon.log, copied to daemon.log.1 (.2, .3) and
                     truncated when it grows past 16 MiB
    limits           open files 1048576, processes and core size unlimited, OOM score
                     adjustment -999; the environment reset to PATH and the locale

The daemon is ``<venv>/bin/clearcri serve --config <config>``. The supervisor itself
runs the code of the release that started it: ``clearcri node upgrade`` replaces it (a
SIGTERM, so the daemon stops as above, then a new supervisor from the new release).

The functions near the end (pidfile, process and cgroup look-ups) are what ``clearcri
node`` uses to find, stop and clean up after a supervisor; they import only the
standard library and the cgroup helpers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import resource
import shutil
import signal
import sys
import time
import tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.cgroups import hierarchies, make_cgroup
from sandbox.procfs import pid_alive, read_cmdline

DEFAULT_CONFIG = Path("/etc/clearcri/config.toml")
DEFAULT_DAEMON = Path("/opt/clearcri/venv/bin/clearcri")
DEFAULT_PIDFILE = Path("/run/clearcri/supervisor.pid")
DEFAULT_LOG_DIR = Path("/var/log/clearcri")
DEFAULT_RUN_DIR = Path("/run/clearcri")
#: The daemon's own lock file in its run dir (cri/server.py), holding its PID.
DAEMON_LOCK = "clearcri.lock"
DEFAULT_CGROUP = "clearcri.service"
LOG_NAME = "daemon.log"

#: The environment the daemon gets (as a systemd unit's: a fixed PATH, the locale).
DAEMON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSED_ENV: tuple[str, ...] = ("LANG", "LANGUAGE", "LC_ALL", "TZ")

#: The unit's LimitNOFILE, and the OOM score adjustment of its OOMScoreAdjust.
NOFILE_LIMIT = 1048576
OOM_SCORE_ADJ = -999

#: Signals the supervisor takes with sigtimedwait (blocked otherwise).
WATCHED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})
#: Signals the daemon gets back at their default action (Python ignores the last two).
RESET_SIGNALS = frozenset({*WATCHED, signal.SIGPIPE, signal.SIGXFSZ})

#: The namespaces --init-namespaces joins (the mount namespace is the caller's to enter:
#: ``nsenter --target 1 --mount``; a PID namespace cannot be changed for oneself).
INIT_NAMESPACES: tuple[tuple[str, int], ...] = (
    ("cgroup", 0x02000000),  # CLONE_NEWCGROUP
    ("ipc", 0x08000000),  # CLONE_NEWIPC
    ("uts", 0x04000000),  # CLONE_NEWUTS
    ("net", 0x40000000),  # CLONE_NEWNET
)


class SupervisorError(Exception):
    """The supervisor cannot start; the message says why."""


@dataclass
class RestartPolicy:
    """Restart=always with RestartSec, and a cap on the start rate: like systemd's
    StartLimitBurst in StartLimitIntervalSec, except that past it the supervisor waits
    ``hold_off`` seconds and tries again rather than giving up (nothing else would
    start the daemon)."""

    restart_sec: float = 2.0
    burst: int = 5
    interval: float = 10.0
    hold_off: float = 30.0
    starts: deque[float] = field(default_factory=deque)

    def started(self, now: float) -> None:
        self.starts.append(now)
        while len(self.starts) > self.burst:
            self.starts.popleft()

    def delay(self, now: float) -> tuple[float, str]:
        """Seconds to wait before the next start, and why when it is the hold-off."""
        recent = [t for t in self.starts if now - t < self.interval]
        if len(recent) >= self.burst:
            return self.hold_off, (
                f"the daemon was started {len(recent)} times within {self.interval:g} s; "
                f"holding off {self.hold_off:g} s before starting it again"
            )
        return self.restart_sec, ""


@dataclass
class Settings:
    config: Path = DEFAULT_CONFIG
    daemon: Path = DEFAULT_DAEMON
    pidfile: Path = DEFAULT_PIDFILE
    #: None: ``<daemon.log_dir>/daemon.log`` from the config; ``-``: keep stdout/stderr
    #: (with --foreground only).
    log: Path | None = None
    #: Cgroup name below each hierarchy's root; empty: stay in the current cgroups.
    cgroup: str = DEFAULT_CGROUP
    init_namespaces: bool = False
    foreground: bool = False
    stop_timeout: float = 90.0
    log_max_bytes: int = 16 << 20
    log_keep: int = 3
    policy: RestartPolicy = field(default_factory=RestartPolicy)

    def log_path(self) -> Path | None:
        if self.log is None:
            return log_dir_of(self.config) / LOG_NAME
        return None if str(self.log) == "-" else self.log

    def daemon_argv(self) -> list[str]:
        return [str(self.daemon), "serve", "--config", str(self.config)]


def _daemon_dir(config: Path, key: str, default: Path) -> Path:
    try:
        data = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return default
    value = data.get("daemon", {}).get(key)
    return Path(value) if isinstance(value, str) and value else default


def log_dir_of(config: Path) -> Path:
    """``daemon.log_dir`` of a config file (its default when unset or unreadable)."""
    return _daemon_dir(config, "log_dir", DEFAULT_LOG_DIR)


def run_dir_of(config: Path) -> Path:
    """``daemon.run_dir`` of a config file (its default when unset or unreadable)."""
    return _daemon_dir(config, "run_dir", DEFAULT_RUN_DIR)


def cgroup_name(prefix: Path) -> str:
    """The supervisor's cgroup for an install under ``prefix``: clearcri.service for the
    node's own, a name of its own for any other prefix (tests install into temporary
    prefixes on machines that may run a real one)."""
    if prefix == Path("/"):
        return DEFAULT_CGROUP
    digest = hashlib.sha256(str(prefix).encode()).hexdigest()[:12]
    return f"clearcri-{digest}.service"


def daemon_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    source = os.environ if environ is None else environ
    env = {"PATH": DAEMON_PATH}
    env.update({k: source[k] for k in PASSED_ENV if k in source})
    return env


# --------------------------------------------------------------------------------------
# The log file


class DaemonLog:
    """The log file the daemon writes to directly (O_APPEND), rotated by copy and
    truncate: the daemon's descriptor stays valid, and it writes at the new end. Lines
    written between the copy and the truncation are lost, as with logrotate's
    copytruncate."""

    def __init__(self, path: Path | None, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        if path is None:
            self.fd = os.dup(2)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError):
            os.write(self.fd, f"{stamp} clearcri-supervise[{os.getpid()}]: {text}\n".encode())

    def rotate_if_needed(self) -> bool:
        if self.path is None or self.max_bytes <= 0:
            return False
        try:
            if os.fstat(self.fd).st_size <= self.max_bytes:
                return False
            for n in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            if self.keep > 0:
                shutil.copyfile(self.path, self.path.with_name(f"{self.path.name}.1"))
            os.ftruncate(self.fd, 0)
        except OSError as exc:
            self.line(f"cannot rotate {self.path}: {exc}")
            return False
        self.line(f"rotated {self.path} (over {self.max_bytes} bytes)")
        return True

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------------------
# Where the supervisor runs: namespaces, cgroup, limits


def _same_namespace(name: str, pid: int = 1) -> bool:
    mine = os.stat(f"/proc/self/ns/{name}")
    theirs = os.stat(f"/proc/{pid}/ns/{name}")
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def join_init_namespaces() -> list[str]:
    """Enter PID 1's cgroup, IPC, UTS and network namespaces where they are not ours
    already (the DaemonSet's ``nsenter --target 1 --mount`` enters only the mount
    namespace). Returns what could not be done."""
    libc = ctypes.CDLL(None, use_errno=True)
    problems = []
    for name, flag in INIT_NAMESPACES:
        try:
            if _same_namespace(name):
                continue
            fd = os.open(f"/proc/1/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            problems.append(f"cannot compare with or open PID 1's {name} namespace: {exc}")
            continue
        try:
            if libc.setns(fd, flag) != 0:
                err = ctypes.get_errno()
                problems.append(f"cannot enter PID 1's {name} namespace: {os.strerror(err)}")
        finally:
            os.close(fd)
    return problems


def enter_cgroup(name: str, pid: int | None = None) -> list[Path]:
    """Move ``pid`` (default: this process) into ``/<name>`` of every cgroup hierarchy,
    made where missing. Returns the cgroup directories, one per hierarchy."""
    pid = os.getpid() if pid is None else pid
    if "/" in name or name in ("", ".", ".."):
        raise SupervisorError(f"cgroup name {name!r} must be one path component")
    paths = []
    roots = hierarchies()
    if not roots:
        raise SupervisorError("no cgroup hierarchy is mounted")
    for root in roots:
        path = root / name
        try:
            make_cgroup(root, name)
            (path / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as exc:
            raise SupervisorError(
                f"cannot move the supervisor into the cgroup {path}: {exc}"
                + (
                    " (in a cgroup namespace of its own: --init-namespaces enters PID 1's)"
                    if exc.errno in (errno.ENOENT, errno.EPERM, errno.EACCES)
                    else ""
                )
            ) from exc
        paths.append(path)
    return paths


def remove_cgroup(name: str, *, leave: bool = False) -> list[Path]:
    """rmdir ``/<name>`` in every hierarchy (after moving this process to each root with
    ``leave``). Returns the ones that still hold processes and stay."""
    kept = []
    for root in hierarchies():
        path = root / name
        if not path.is_dir():
            continue
        if leave:
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(f"{os.getpid()}\n")
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            kept.append(path)
    return kept


def apply_limits() -> list[str]:
    """The unit's LimitNOFILE, LimitNPROC, LimitCORE and OOMScoreAdjust, for the
    supervisor and so for the daemon (as far as this process may raise them). Returns
    what could not be set."""
    problems = []
    wanted = (
        ("open files", resource.RLIMIT_NOFILE, NOFILE_LIMIT),
        ("processes", resource.RLIMIT_NPROC, resource.RLIM_INFINITY),
        ("core size", resource.RLIMIT_CORE, resource.RLIM_INFINITY),
    )
    for label, which, value in wanted:
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError):
            _soft, hard = resource.getrlimit(which)
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(which, (hard, hard))
            shown = "unlimited" if value == resource.RLIM_INFINITY else str(value)
            problems.append(f"the {label} limit stays at {hard}, not {shown}")
    try:
        Path("/proc/self/oom_score_adj").write_text(f"{OOM_SCORE_ADJ}\n")
    except OSError as exc:
        problems.append(f"cannot set the OOM score adjustment to {OOM_SCORE_ADJ}: {exc}")
    return problems


def _status_field(pid: int | str, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""


def context_problems(*, namespaces: bool = True) -> list[str]:
    """What this process would pass on to the daemon that an init would not: a
    capability bounding set smaller than PID 1's, a seccomp filter, and (with
    ``namespaces``) a network namespace that is not PID 1's. All three are what the Helm
    chart's pod has unless it is privileged and on the host's network."""
    problems = []
    try:
        mine = int(_status_field("self", "CapBnd") or "0", 16)
        init = int(_status_field(1, "CapBnd") or "0", 16)
        missing = init & ~mine
        if missing:
            problems.append(
                f"the capability bounding set lacks {bin(missing).count('1')} capabilities "
                f"PID 1 has (mask {missing:#x}): the daemon cannot get them"
            )
        if _status_field("self", "Seccomp") not in ("", "0"):
            problems.append("a seccomp filter is on: the daemon inherits it")
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError):
        if namespaces and not _same_namespace("net"):
            problems.append("the network namespace is not PID 1's: the daemon runs in it")
    return problems


# --------------------------------------------------------------------------------------
# The supervisor


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"was killed by {signal.Signals(sig).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """The loop: one daemon process, restarted when it exits; signals taken with
    sigtimedwait (blocked otherwise), so none arrives in the middle of a step."""

    #: How often the log's size is looked at.
    ROTATE_CHECK = 10.0

    def __init__(self, settings: Settings, log: DaemonLog) -> None:
        self.settings = settings
        self.log = log
        self.policy = settings.policy
        self.child: int | None = None
        self.child_started = 0.0
        self.next_start = 0.0

    def spawn(self) -> None:
        argv = self.settings.daemon_argv()
        actions: list[tuple[int, int, str, int, int] | tuple[int, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, self.log.fd, 1),
            (os.POSIX_SPAWN_DUP2, self.log.fd, 2),
        ]
        now = time.monotonic()
        self.policy.started(now)
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                daemon_env(),
                file_actions=actions,
                setsigmask=(),
                setsigdef=RESET_SIGNALS,
            )
        except OSError as exc:
            delay, why = self.policy.delay(now)
            self.log.line(f"cannot start {argv[0]}: {exc}; trying again in {delay:g} s")
            if why:
                self.log.line(why)
            self.next_start = now + delay
            return
        self.child, self.child_started = pid, now
        self.log.line(f"started the daemon (pid {pid}): {' '.join(argv)}")

    def reap(self) -> int | None:
        """Reap exited children; the daemon's wait status if it was one of them."""
        status = None
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.child:
                self.child, status = None, wstatus
        return status

    def stop_daemon(self, why: str) -> None:
        """SIGTERM to the daemon's PID only, SIGKILL to it after the stop timeout."""
        pid = self.child
        if pid is None:
            return
        self.log.line(f"{why}: sending SIGTERM to the daemon (pid {pid}) alone")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.stop_timeout
        killed = False
        while True:
            status = self.reap()
            if status is not None:
                self.log.line(f"the daemon (pid {pid}) {_describe(status)}")
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not killed:
                self.log.line(
                    f"the daemon (pid {pid}) did not stop within "
                    f"{self.settings.stop_timeout:g} s: SIGKILL to it alone"
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed = True
            wait = 1.0 if killed else max(remaining, 0.05)
            signal.sigtimedwait([signal.SIGCHLD], wait)

    def stop_stray_daemon(self) -> None:
        """A daemon this supervisor did not start may hold the daemon's lock: one whose
        supervisor was killed, one started by hand. A daemon started now would refuse
        to run beside it, so it is stopped as the supervisor stops its own (SIGTERM to
        its PID alone: its pod VMs stay for the next daemon to re-adopt)."""
        lock = run_dir_of(self.settings.config) / DAEMON_LOCK
        pid = lock_holder(lock)
        if pid is None or pid == os.getpid():
            return
        self.log.line(
            f"a daemon this supervisor did not start holds {lock} (pid {pid}): "
            "sending it SIGTERM, to run the daemon supervised"
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone([pid], self.settings.stop_timeout):
            self.log.line(f"pid {pid} did not stop: SIGKILL to it alone")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone([pid], 10)

    def run(self) -> int:
        self.stop_stray_daemon()
        self.spawn()
        while True:
            now = time.monotonic()
            timeout = self.ROTATE_CHECK
            if self.child is None:
                timeout = min(timeout, max(self.next_start - now, 0.0))
            info = signal.sigtimedwait(WATCHED, timeout) if timeout > 0 else None
            if info is None:
                self.log.rotate_if_needed()
                if self.child is None and time.monotonic() >= self.next_start:
                    self.spawn()
                continue
            if info.si_signo == signal.SIGCHLD:
                pid = self.child
                status = self.reap()
                if status is not None:
                    now = time.monotonic()
                    delay, why = self.policy.delay(now)
                    self.log.line(
                        f"the daemon (pid {pid}) {_describe(status)} after "
                        f"{now - self.child_started:.1f} s; starting it again in {delay:g} s"
                    )
                    if why:
                        self.log.line(why)
                    self.next_start = now + delay
            elif info.si_signo == signal.SIGHUP:
                self.stop_daemon("restart requested (SIGHUP)")
                self.log.rotate_if_needed()
                self.spawn()
            else:
                name = signal.Signals(info.si_signo).name
                self.stop_daemon(f"stopping ({name})")
                return 0


# --------------------------------------------------------------------------------------
# Starting it


class PidFile:
    """An exclusive flock on the pidfile, held for the supervisor's life."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self.fd, 32).decode(errors="replace").strip()
            os.close(self.fd)
            raise SupervisorError(
                f"a supervisor already runs for {path} (pid {owner or 'unknown'})"
            ) from None

    def write(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)


#: In the detached supervisor until it is ready: the pipe the starting process reads.
_ready_fd: list[int] = []


def _detach() -> int | None:
    """Double fork with a new session in between. In the starting process: wait for the
    supervisor's word (or its end) and return the exit code. In the supervisor: None
    (the pipe for its word is in ``_ready_fd``)."""
    read_end, write_end = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        os.close(read_end)
        os.waitpid(first, 0)
        word = b"".join(chunks).decode(errors="replace").strip()
        if word.startswith("ready "):
            print(word.removeprefix("ready "), flush=True)
            return 0
        print(f"clearcri supervise: {word or 'the supervisor exited at start'}", file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    _ready_fd.append(write_end)
    return None


def _tell(word: str) -> None:
    """Give the starting process its word (once) and let it return."""
    while _ready_fd:
        fd = _ready_fd.pop()
        with contextlib.suppress(OSError):
            os.write(fd, word.encode())
        os.close(fd)


def supervise(settings: Settings) -> int:
    """Run the supervisor: detached (the calling process returns once it runs, printing
    its PID, pidfile and log), or in the foreground with ``settings.foreground`` (under
    another init)."""
    if not settings.daemon.is_file():
        print(f"clearcri supervise: {settings.daemon} does not exist", file=sys.stderr)
        return 1
    if not settings.foreground:
        code = _detach()
        if code is not None:
            return code
    try:
        return _supervise(settings)
    except (SupervisorError, OSError) as exc:
        if not _ready_fd:
            print(f"clearcri supervise: {exc}", file=sys.stderr)
        _tell(str(exc))
        return 1


def _supervise(settings: Settings) -> int:
    # Signals wait for the loop from here on: a SIGTERM during the set-up stops the
    # daemon as soon as it has started, rather than leaving a pidfile and cgroup behind.
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    os.umask(0o022)
    os.chdir("/")
    pidfile = PidFile(settings.pidfile)
    notes: list[str] = []
    cgroups: list[Path] = []
    log: DaemonLog | None = None
    try:
        if settings.init_namespaces:
            notes += join_init_namespaces()
        if settings.cgroup:
            cgroups = enter_cgroup(settings.cgroup)
        notes += apply_limits()
        notes += context_problems()
        try:
            log = DaemonLog(settings.log_path(), settings.log_max_bytes, settings.log_keep)
        except OSError as exc:
            raise SupervisorError(f"cannot open the log {settings.log_path()}: {exc}") from exc
        pidfile.write(os.getpid())
        if not settings.foreground:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.close(null)
            os.dup2(log.fd, 1)
            os.dup2(log.fd, 2)
        where = ", ".join(str(p) for p in cgroups) or "the cgroups it was started in"
        log.line(
            f"supervising {settings.daemon} (config {settings.config}, pidfile "
            f"{settings.pidfile}, cgroup {where})"
        )
        for note in notes:
            log.line(f"warning: {note}")
        _tell(
            f"ready supervisor pid {os.getpid()}, pidfile {settings.pidfile}, "
            f"log {settings.log_path() or 'stderr'}"
        )
        code = Supervisor(settings, log).run()
        log.line("stopped")
        return code
    finally:
        if settings.cgroup:  # also when only some hierarchies could be entered
            kept = remove_cgroup(settings.cgroup, leave=True)
            if kept and log is not None:
                log.line(
                    "keeping the cgroup "
                    + ", ".join(str(p) for p in kept)
                    + ": processes the daemon started are in it"
                )
        pidfile.remove()
        if log is not None:
            log.close()


# --------------------------------------------------------------------------------------
# Looking at a supervisor from outside (clearcri node, the tests)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state is the first)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text.rsplit(")", 1)[1].split()


def is_supervisor(pid: int, pidfile: Path) -> bool:
    """Whether ``pid`` is a ``clearcri supervise`` for ``pidfile``."""
    argv = read_cmdline(pid)
    if "supervise" not in argv:
        return False
    if "--pidfile" in argv:
        i = argv.index("--pidfile")
        return i + 1 < len(argv) and Path(argv[i + 1]) == pidfile
    return any(a == f"--pidfile={pidfile}" for a in argv) or pidfile == DEFAULT_PIDFILE


def lock_holder(path: Path) -> int | None:
    """The PID written in a lock file whose flock someone holds, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() and pid_alive(int(text)) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def supervisor_pid(pidfile: Path) -> int | None:
    """The PID of the supervisor holding ``pidfile`` (its lock held, its command line a
    supervisor's for that pidfile), or None."""
    pid = lock_holder(pidfile)
    return pid if pid is not None and is_supervisor(pid, pidfile) else None


def interpreter(pid: int) -> str:
    """argv[0] of ``pid``: for a supervisor, the python of the release it runs from."""
    argv = read_cmdline(pid)
    return argv[0] if argv else ""


def daemon_pid(supervisor: int) -> int | None:
    """The daemon the supervisor ``supervisor`` runs (its child), or None."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if len(fields) > 1 and fields[1] == str(supervisor) and fields[0] not in ("Z", "X"):
            return int(entry.name)
    return None


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
