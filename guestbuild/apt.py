"""Debian packages: candidate versions from ``apt-cache``, the dependency closure of
the guest OS image, and downloaded ``.deb`` files checked against their SHA256."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from guestbuild.common import GuestBuildError, ProgressFn, run, sha256_file


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    sha256: str
    depends: tuple[tuple[str, ...], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.name}={self.version}:{self.sha256}"


def parse_depends(field: str) -> tuple[tuple[str, ...], ...]:
    """``a (>= 1), b | c:any`` -> ``(("a",), ("b", "c"))`` (versions are not checked)."""
    groups = []
    for group in field.split(","):
        alternatives = []
        for alt in group.split("|"):
            name = re.sub(r"\(.*?\)|\[.*?\]|<.*?>", "", alt).strip().split(":")[0]
            if name:
                alternatives.append(name)
        if alternatives:
            groups.append(tuple(alternatives))
    return tuple(groups)


def parse_apt_show(text: str) -> dict[str, DebPackage]:
    """Stanzas of ``apt-cache show --no-all-versions`` by package name."""
    packages: dict[str, DebPackage] = {}
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and key is not None:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" not in fields or "SHA256" not in fields:
            continue
        deps = ", ".join(v for k in ("Pre-Depends", "Depends") if (v := fields.get(k)))
        name = fields["Package"]
        if name not in packages:
            packages[name] = DebPackage(
                name, fields.get("Version", ""), fields["SHA256"], parse_depends(deps)
            )
    return packages


def apt_show(names: Iterable[str]) -> dict[str, DebPackage]:
    """Candidate versions of real packages among ``names`` (virtual ones are absent)."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    try:
        proc = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", *wanted],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise GuestBuildError("apt-cache is not installed (a Debian host is needed)") from exc
    # Exit status is non-zero when some names are virtual; those are simply absent.
    return parse_apt_show(proc.stdout)


def resolve_closure(
    roots: Iterable[str],
    show: Callable[[Iterable[str]], Mapping[str, DebPackage]],
    pruned: Callable[[str], bool],
) -> list[DebPackage]:
    """Depends/Pre-Depends closure of ``roots``, cut at pruned packages.

    For alternatives the first real, unpruned package is taken; a dependency group with a
    pruned alternative is considered satisfied (that is what pruning means).
    """
    known: dict[str, DebPackage | None] = {}

    def lookup(names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in known]
        if unknown:
            found = show(unknown)
            for n in unknown:
                known[n] = found.get(n)

    chosen: dict[str, DebPackage] = {}
    level = list(dict.fromkeys(roots))
    lookup(level)
    for name in level:
        if known[name] is None:
            raise GuestBuildError(f"package {name} is not available from apt")
    while level:
        for name in level:
            pkg = known[name]
            assert pkg is not None
            chosen[name] = pkg
        lookup(alt for name in level for group in chosen[name].depends for alt in group)
        next_level: list[str] = []
        for name in level:
            for group in chosen[name].depends:
                if any(alt in chosen or alt in next_level for alt in group):
                    continue
                if any(pruned(alt) for alt in group):
                    continue
                real = [alt for alt in group if known.get(alt) is not None]
                if not real:
                    raise GuestBuildError(
                        f"cannot resolve dependency {' | '.join(group)} of {name}"
                    )
                next_level.append(real[0])
        level = next_level
    return [chosen[n] for n in sorted(chosen)]


def resolve_kernel_package(meta_package: str) -> str:
    """The versioned kernel package a kernel meta-package depends on."""
    out = run(["apt-cache", "depends", meta_package])
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise GuestBuildError(f"cannot resolve the package behind {meta_package}")


class DebCache:
    """Downloaded .deb files, named by package and content hash, checked on download."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, pkg: DebPackage) -> Path:
        return self.directory / f"{pkg.name}_{pkg.sha256[:16]}.deb"

    def fetch(self, packages: Sequence[DebPackage], progress: ProgressFn) -> dict[str, Path]:
        self.directory.mkdir(parents=True, exist_ok=True)
        missing = [p for p in packages if not self.path(p).exists()]
        if missing:
            progress(f"downloading {len(missing)} package(s) with apt-get")
            with tempfile.TemporaryDirectory(dir=self.directory, prefix=".dl-") as tmp:
                run(
                    [
                        "apt-get",
                        "download",
                        "-q",
                        "-o",
                        "APT::Sandbox::User=root",
                        *(f"{p.name}={p.version}" for p in missing),
                    ],
                    cwd=Path(tmp),
                )
                by_hash = {sha256_file(f): f for f in Path(tmp).glob("*.deb")}
                for pkg in missing:
                    got = by_hash.get(pkg.sha256)
                    if got is None:
                        raise GuestBuildError(
                            f"apt-get download of {pkg.name}={pkg.version} gave no file "
                            f"with the expected SHA256 {pkg.sha256}"
                        )
                    os.replace(got, self.path(pkg))
        return {p.name: self.path(p) for p in packages}

    def prune(self, keep: Iterable[DebPackage]) -> None:
        """Delete cached .deb files other than ``keep``."""
        wanted = {self.path(p) for p in keep}
        for path in self.directory.glob("*.deb"):
            if path not in wanted:
                path.unlink()


def deb_extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(dest)])
