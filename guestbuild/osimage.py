"""The guest OS image's root tree, made from the unpacked packages: what is pruned, the
merged /usr, busybox's applets, the agent and its launcher, /etc, precompiled bytecode,
and the check that every program finds its shared libraries in the tree."""

from __future__ import annotations

import compileall
import importlib.util
import os
import py_compile
import shutil
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from guestbuild.common import GuestBuildError, remove, run
from guestbuild.elf import ELF_MAGIC, elf_dynamic_info

#: Packages never taken into the image (install-time or interactive only). Recursion
#: stops at them, so their own dependencies are not pulled in either.
OS_PRUNED_PACKAGES: frozenset[str] = frozenset(
    {
        "base-files",
        "debconf",
        "debconf-2.0",
        "dpkg",
        "gcc-12-base",
        "install-info",
        "libcom-err2",
        "libcrypt1",
        "libdb5.3",
        "libgdbm-compat4",
        "libgdbm6",
        "libgssapi-krb5-2",
        "libk5crypto3",
        "libkeyutils1",
        "libkrb5-3",
        "libkrb5support0",
        "libmd0",
        "libncursesw6",
        "libnsl2",
        "libreadline8",
        "libsqlite3-0",
        "libtinfo6",
        "libtirpc-common",
        "libtirpc3",
        "mailcap",
        "media-types",
        "mime-support",
        "readline-common",
        "tar",
        "tzdata",
    }
)
OS_PRUNED_PREFIXES: tuple[str, ...] = ("libpam", "perl", "libperl")

PYTHON_VERSION = "3.11"
PYTHON_LIB = f"usr/lib/python{PYTHON_VERSION}"

#: Parts of the Python standard library the guest never uses.
PYTHON_PRUNED: tuple[str, ...] = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "sqlite3",
    "curses",
    "unittest/test",
    "ctypes/test",
    "turtle.py",
    "pydoc.py",
)

#: Extension modules dropped because their libraries are pruned or they are test code.
PYTHON_PRUNED_EXTENSIONS: tuple[str, ...] = (
    "_crypt",
    "_ctypes_test",
    "_curses",
    "_curses_panel",
    "_dbm",
    "_gdbm",
    "_sqlite3",
    "_testbuffer",
    "_testcapi",
    "_testclinic",
    "_testimportmultiple",
    "_testinternalcapi",
    "_testmultiphase",
    "_xxsubinterpreters",
    "_xxtestfuzz",
    "nis",
    "ossaudiodev",
    "readline",
    "xxlimited",
    "xxlimited_35",
)

#: Whole directories removed from the image root.
OS_PRUNED_PATHS: tuple[str, ...] = (
    "usr/share",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/x86_64-linux-gnu/audit",
    "usr/lib/python3",
    "usr/lib/valgrind",
    "usr/lib/lintian",
    "usr/include",
    "etc/cron.daily",
    "etc/logrotate.d",
    "etc/systemd",
    "etc/init.d",
)

#: Library search path of the guest's dynamic loader (no ld.so.cache in the image).
GUEST_LIBRARY_DIRS: tuple[str, ...] = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
)

AGENT_DIR_IN_IMAGE = "usr/lib/clearcri"
AGENT_LAUNCHER = "from agent.guest.server import main\n\nmain()\n"


def is_pruned_package(name: str) -> bool:
    return name in OS_PRUNED_PACKAGES or name.startswith(OS_PRUNED_PREFIXES)


def agent_source_dir() -> Path:
    spec = importlib.util.find_spec("agent")
    if spec is None or not spec.submodule_search_locations:
        raise GuestBuildError("the agent package is not importable; cannot build the OS image")
    return Path(next(iter(spec.submodule_search_locations)))


def merge_usr(root: Path) -> None:
    """Move /bin, /sbin, /lib* into /usr and leave symlinks (Debian's merged /usr)."""
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        top = root / name
        if top.is_symlink() or not top.exists():
            continue
        dest = root / "usr" / name
        dest.mkdir(parents=True, exist_ok=True)
        _merge_tree(top, dest)
        shutil.rmtree(top)
        top.symlink_to(f"usr/{name}")


def _merge_tree(src: Path, dest: Path) -> None:
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir():
            _merge_tree(entry, target)
        elif target.exists() or target.is_symlink():
            raise GuestBuildError(f"/{target.name} exists both in / and in /usr")
        else:
            os.replace(entry, target)


def prune_os_root(root: Path) -> None:
    for rel in OS_PRUNED_PATHS:
        remove(root / rel)
    pylib = root / PYTHON_LIB
    for rel in PYTHON_PRUNED:
        remove(pylib / rel)
    for config in pylib.glob("config-*"):
        remove(config)
    dynload = pylib / "lib-dynload"
    for name in PYTHON_PRUNED_EXTENSIONS:
        for ext in dynload.glob(f"{name}.cpython-*.so"):
            ext.unlink()
    for cache in list(root.rglob("__pycache__")):
        remove(cache)
    for pattern in ("*.a", "*.la"):  # static libraries, libtool archives
        for archive in list((root / "usr" / "lib").rglob(pattern)):
            archive.unlink()
    remove(root / "usr" / "lib" / "x86_64-linux-gnu" / "pkgconfig")
    for tests in list(pylib.rglob("tests")):
        if tests.is_dir():
            remove(tests)


def _busybox_applets(busybox: Path) -> list[str]:
    """Applet install paths (``bin/sh``, ``usr/sbin/chroot``, ...) of a busybox binary."""
    return sorted(run([str(busybox), "--list-full"]).split())


def install_busybox_applets(root: Path) -> None:
    busybox = root / "usr" / "bin" / "busybox"
    if not busybox.is_file():
        raise GuestBuildError("busybox is missing from the guest OS image")
    for applet in _busybox_applets(busybox):
        if applet == "linuxrc":
            continue
        parts = applet.split("/")
        if parts[0] != "usr":
            parts = ["usr", *parts]
        link = root.joinpath(*parts)
        if link.exists() or link.is_symlink():
            continue  # a real program of that name wins
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/usr/bin/busybox")


def install_agent(root: Path, source: Path, launcher: str) -> None:
    dest = root / AGENT_DIR_IN_IMAGE
    pkg = dest / "agent"
    pkg.mkdir(parents=True)
    for path in sorted(source.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        target = pkg / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    launcher_path = dest / "clearcri-agent"
    launcher_path.write_text(launcher)
    launcher_path.chmod(0o755)
    build_nsexec(source / "guest" / "nsexec.c", dest / "nsexec")


def build_nsexec(source: Path, target: Path) -> None:
    """The agent's exec helper (agent/guest/nsexec.c): static, so that a process start
    under TCG maps one small file and no shared library."""
    run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(target), str(source)])
    run(["strip", str(target)])
    target.chmod(0o755)


def write_etc(root: Path) -> None:
    for directory in ("run", "tmp", "proc", "sys", "dev", "mnt", "root", "etc", "var"):
        (root / directory).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    etc = root / "etc"
    for name in ("hostname", "hosts", "resolv.conf"):
        remove(etc / name)
        (etc / name).symlink_to(f"/run/clearcri/etc/{name}")
    remove(etc / "mtab")
    (etc / "mtab").symlink_to("/proc/self/mounts")
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for name, target in (("run", "/run"), ("tmp", "/tmp"), ("lock", "/run/lock")):
        remove(root / "var" / name)
        (root / "var" / name).symlink_to(target)


def compile_python(root: Path) -> None:
    """Bytecode for the read-only root: unchecked-hash pycs are used without stat-ing
    sources for mtimes, and nothing is ever written at run time."""
    mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
    for rel in (PYTHON_LIB, AGENT_DIR_IN_IMAGE):
        ok = compileall.compile_dir(
            root / rel,
            ddir="/" + rel,
            quiet=2,
            workers=os.cpu_count() or 1,
            invalidation_mode=mode,
        )
        if not ok:
            raise GuestBuildError(f"byte-compiling /{rel} failed")


def resolve_in_root(root: Path, guest_path: str) -> Path | None:
    """Where ``guest_path`` (absolute, inside the guest) lands under ``root``, following
    symlinks as the guest would; None if it does not exist."""
    parts = [p for p in guest_path.split("/") if p]
    current: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if current:
                current.pop()
            continue
        candidate = root.joinpath(*current, part)
        try:
            st = candidate.lstat()
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        current.append(part)
    return root.joinpath(*current)


def missing_libraries(root: Path) -> list[str]:
    """Problems of the form "<file>: needs <lib>" for every ELF under ``root``."""
    problems: list[str] = []
    for path in sorted(_walk_files(root)):
        with path.open("rb") as f:
            if f.read(4) != ELF_MAGIC:
                continue
        rel = "/" + path.relative_to(root).as_posix()
        try:
            info = elf_dynamic_info(path.read_bytes())
        except (GuestBuildError, struct.error, ValueError, IndexError) as exc:
            problems.append(f"{rel}: unreadable ELF ({exc})")
            continue
        if info is None:
            continue
        if info.interpreter and resolve_in_root(root, info.interpreter) is None:
            problems.append(f"{rel}: needs interpreter {info.interpreter}")
        origin = os.path.dirname(rel)
        dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in info.runpath]
        dirs += GUEST_LIBRARY_DIRS
        for lib in info.needed:
            if not any(resolve_in_root(root, f"{d}/{lib}") for d in dirs):
                problems.append(f"{rel}: needs {lib}")
    return problems


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path
