"""The clearcri guest kernel: built from Debian's ``linux-source-6.1`` package with a
minimal configuration of our own (guestbuild/guest_kernel.config; docs/guest.md).

``make allnoconfig`` starts from nothing, the fragment switches on what a pod VM uses
(every driver built in, no modules), ``make olddefconfig`` fills in dependencies, and
the build fails if Kconfig dropped any option the fragment asks for (a dependency
missing from the fragment). The result is an uncompressed ``vmlinux`` that QEMU starts
through its PVH entry point, cached by its inputs (source package, fragment, compiler):
a second build with the same inputs is a copy.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from guestbuild.common import cache_root, compiler_version

ProgressFn = Callable[[str], None]

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = f"usr/src/{SOURCE_PACKAGE}.tar.xz"
CONFIG_RESOURCE = "guest_kernel.config"
LOCALVERSION = "-clearcri"
#: Debian packages the build runs (the source package itself is only downloaded).
BUILD_PACKAGES = ("gcc", "make", "flex", "bison", "bc", "libelf-dev")
_BUILD_TOOLS = ("gcc", "make", "flex", "bison", "bc", "tar", "xz")
_LIBELF_HEADER = Path("/usr/include/libelf.h")
#: How often (in compiler lines) the build reports progress.
PROGRESS_EVERY = 400


class KernelBuildError(Exception):
    """The guest kernel could not be built."""


def config_fragment() -> bytes:
    return importlib.resources.files("guestbuild").joinpath(CONFIG_RESOURCE).read_bytes()


def default_cache_dir() -> Path:
    return cache_root("kernel")


def kernel_release(source_version: str) -> str:
    """``6.1.192-3`` (the source package's version) -> ``6.1.192-clearcri``."""
    return source_version.split("-", 1)[0].split("+", 1)[0] + LOCALVERSION


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value ("n" for ``# CONFIG_X is not set``)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        unset = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if unset:
            values[unset.group(1)] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            values[key] = value
    return values


def config_problems(fragment: str, final: str) -> list[str]:
    """Options of ``fragment`` the final ``.config`` does not carry as asked."""
    wanted = parse_config(fragment)
    have = parse_config(final)
    problems = []
    for key, value in wanted.items():
        got = have.get(key, "n")
        if got != value:
            problems.append(f"{key}={value} (Kconfig gave {got})")
    return problems


def missing_build_tools() -> list[str]:
    missing = [tool for tool in _BUILD_TOOLS if shutil.which(tool) is None]
    if not _LIBELF_HEADER.exists():
        missing.append("libelf-dev")
    return missing


class KernelBuilder:
    """Builds (or finds in its cache) the guest kernel for one source package."""

    def __init__(
        self,
        source_deb: Callable[[], Path],
        source_version: str,
        *,
        cache_dir: Path | None = None,
        fragment: bytes | None = None,
        jobs: int | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        self.source_deb = source_deb
        self.source_version = source_version
        self.cache_dir = cache_dir or default_cache_dir()
        self.fragment = config_fragment() if fragment is None else fragment
        self.jobs = jobs or (os.cpu_count() or 1) + 1
        self.progress: ProgressFn = progress or (lambda _line: None)

    @functools.cached_property
    def input_hash(self) -> str:
        digest = hashlib.sha256()
        for part in (SOURCE_PACKAGE, self.source_version, LOCALVERSION, compiler_version()):
            digest.update(part.encode() + b"\0")
        digest.update(self.fragment)
        return digest.hexdigest()

    @property
    def cached(self) -> Path:
        return self.cache_dir / f"vmlinux-{self.input_hash[:16]}"

    def build(self) -> Path:
        """The path of the built vmlinux (from the cache when the inputs match)."""
        if self.cached.is_file():
            self.progress(f"kernel: cached build {self.cached.name}")
            return self.cached
        missing = missing_build_tools()
        if missing:
            raise KernelBuildError(
                f"building the guest kernel needs {', '.join(missing)}: "
                f"apt-get install {' '.join(BUILD_PACKAGES)}"
            )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        source = self._source_tree()
        out = self.cache_dir / f"out-{self.source_version}"
        out.mkdir(exist_ok=True)
        self._configure(source, out)
        release = kernel_release(self.source_version)
        self.progress(
            f"kernel: compiling {release} with {self.jobs} jobs (minutes on a cold cache)"
        )
        self._make(source, out, "vmlinux", report=True)
        built = out / "vmlinux"
        tmp = self.cached.with_name(f".{self.cached.name}.tmp-{os.getpid()}")
        shutil.copyfile(built, tmp)
        self._run(["strip", "--strip-debug", str(tmp)])
        os.replace(tmp, self.cached)
        for old in self.cache_dir.glob("vmlinux-*"):
            if old != self.cached:
                old.unlink()
        return self.cached

    def _source_tree(self) -> Path:
        tree = self.cache_dir / f"{SOURCE_PACKAGE}_{self.source_version}"
        if (tree / "Makefile").is_file():
            return tree
        for old in self.cache_dir.glob(f"{SOURCE_PACKAGE}_*"):
            shutil.rmtree(old, ignore_errors=True)
        for old in self.cache_dir.glob("out-*"):
            shutil.rmtree(old, ignore_errors=True)
        deb = self.source_deb()
        unpack = self.cache_dir / f".unpack-{os.getpid()}"
        shutil.rmtree(unpack, ignore_errors=True)
        unpack.mkdir()
        try:
            self.progress(f"kernel: unpacking {SOURCE_PACKAGE} {self.source_version}")
            self._run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout_to=unpack / "data.tar")
            self._run(["tar", "-xf", "data.tar", f"./{SOURCE_TARBALL}"], cwd=unpack)
            self._run(["tar", "-xJf", SOURCE_TARBALL], cwd=unpack)
            os.replace(unpack / SOURCE_PACKAGE, tree)
        finally:
            shutil.rmtree(unpack, ignore_errors=True)
        return tree

    def _configure(self, source: Path, out: Path) -> None:
        self.progress("kernel: configuring (allnoconfig + guestbuild/guest_kernel.config)")
        self._make(source, out, "allnoconfig")
        config = out / ".config"
        fragment = self.fragment.decode()
        config.write_text(
            config.read_text() + f'\nCONFIG_LOCALVERSION="{LOCALVERSION}"\n' + fragment
        )
        self._make(source, out, "olddefconfig")
        problems = config_problems(fragment, config.read_text())
        if problems:
            raise KernelBuildError(
                "the kernel configuration dropped options of guestbuild/guest_kernel.config "
                "(add what they depend on): " + "; ".join(problems[:10])
            )

    def _make(self, source: Path, out: Path, target: str, *, report: bool = False) -> None:
        argv = ["make", "-C", str(source), f"O={out}", f"-j{self.jobs}", target]
        env = dict(os.environ, KBUILD_BUILD_USER="clearcri", KBUILD_BUILD_HOST="clearcri")
        env["KBUILD_BUILD_TIMESTAMP"] = "1970-01-01"
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        tail: list[str] = []
        compiled = 0
        for line in proc.stdout:
            tail = [*tail[-19:], line.rstrip()]
            if report and line.lstrip().startswith("CC "):
                compiled += 1
                if compiled % PROGRESS_EVERY == 0:
                    self.progress(f"kernel: {compiled} files compiled ({line.split()[-1]})")
        if proc.wait() != 0:
            shown = "\n  ".join(line for line in tail if line)
            raise KernelBuildError(f"make {target} failed:\n  {shown}")

    @staticmethod
    def _run(argv: list[str], cwd: Path | None = None, stdout_to: Path | None = None) -> None:
        out = stdout_to.open("wb") if stdout_to is not None else subprocess.PIPE
        try:
            proc = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.PIPE, check=False)
        finally:
            if stdout_to is not None:
                out.close()  # type: ignore[union-attr]
        if proc.returncode != 0:
            raise KernelBuildError(f"{' '.join(argv[:3])} failed: {proc.stderr.decode()[-400:]}")
