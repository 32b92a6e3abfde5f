"""Guest assets: the kernel, the initramfs and the DAX guest OS image (build and locate).

Every pod VM boots the same three files:

* ``vmlinux``: Debian's cloud kernel as an uncompressed PVH-bootable ELF;
* ``initrd.img``: a cpio with busybox, the kernel modules the guest needs and ``/init``
  (``sandbox/guest_init.sh``);
* ``os.img``: a read-only erofs image with python3, crun, busybox and the agent, mapped
  into every VM with DAX from this one host file.

``floor-initrd.img`` boots the same kernel to a trivial ``/init`` (the benchmark floor).

Everything comes from Debian packages fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x``; nothing is installed on the host. Builds are cached under the guest
directory and versioned per component in ``manifest.json``: each component records a hash
of its inputs and is rebuilt only when that hash changes.
"""

from __future__ import annotations

import compileall
import contextlib
import fcntl
import hashlib
import importlib.resources
import importlib.util
import json
import lzma
import os
import py_compile
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox import kernel as guest_kernel
from sandbox.initramfs import Initramfs

DEFAULT_GUEST_DIR = Path("/var/lib/clearcri/guest")

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
#: "clearcri": our own kernel from linux-source-6.1 and sandbox/guest_kernel.config
#: (everything built in, 9p for the pod's share); "debian": Debian's cloud kernel with
#: its modules loaded by the initramfs (no 9p: pods cannot mount host paths).
KERNEL_FLAVORS: tuple[str, ...] = ("clearcri", "debian")
DEFAULT_KERNEL_FLAVOR = "clearcri"
BUSYBOX_PACKAGE = "busybox-static"

#: Modules the guest loads up front (no udev in the guest; hot-plugged devices need
#: their drivers already loaded). Dependencies are added from each module's depends=.
GUEST_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_net",
    "net_failover",
    "failover",
    "libnvdimm",
    "nd_virtio",
    "virtio_pmem",
    "nd_btt",
    "nd_pmem",
    "erofs",
    "libcrc32c",
    "overlay",
    # Containers with CAP_NET_ADMIN may build bridges in the pod (brctl, ip link add
    # type bridge); there is no modprobe in the guest, so the driver is loaded up front.
    "bridge",
)

#: Modules loaded only when the OS image comes from a virtio-blk disk (clearcri.root=).
GUEST_BLK_MODULES: tuple[str, ...] = ("virtio_blk",)

#: Module signatures are dropped: the guest kernel does not enforce them, the modules
#: come with the kernel from the same trusted initramfs, and checking them costs
#: ~0.1 s of boot under TCG.
STRIP_MODULE_SIGNATURES = True
_MODULE_SIG_MARKER = b"~Module signature appended~\n"

#: busybox applets the initramfs /init uses.
INIT_APPLETS: tuple[str, ...] = (
    "sh",
    "mount",
    "umount",
    "mkdir",
    "insmod",
    "usleep",
    "sleep",
    "cat",
    "printf",
    "echo",
    "switch_root",
    "ip",
    "poweroff",
    "reboot",
)

#: Packages whose dependency closure makes the guest OS image.
OS_ROOT_PACKAGES: tuple[str, ...] = ("python3", "libpython3.11-stdlib", "crun", BUSYBOX_PACKAGE)

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

FLOOR_READY_LINE = "clearcri-floor-ready"
FLOOR_INIT = f"#!/bin/sh\necho {FLOOR_READY_LINE}\npoweroff -f\nreboot -f\n"

#: Guest OS image files are padded to this size (memory backends map whole pages).
OS_IMAGE_ALIGN = 2 * 1024 * 1024

#: Bump a component's recipe when the code that builds it changes its output.
RECIPES: Mapping[str, int] = {"kernel": 1, "initrd": 1, "floor_initrd": 1, "os_image": 1}
COMPONENTS: tuple[str, ...] = ("kernel", "initrd", "floor_initrd", "os_image")
OUTPUT_FILES: Mapping[str, str] = {
    "kernel": "vmlinux",
    "initrd": "initrd.img",
    "floor_initrd": "floor-initrd.img",
    "os_image": "os.img",
}
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

ProgressFn = Callable[[str], None]


class GuestError(Exception):
    """Base class of guest asset errors."""


class GuestAssetsMissing(GuestError):
    """The guest assets are not built (or are incomplete)."""


class GuestBuildError(GuestError):
    """Building the guest assets failed."""


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path
    initrd: Path
    os_image: Path
    floor_initrd: Path
    kernel_version: str
    version: str
    kernel_flavor: str = DEFAULT_KERNEL_FLAVOR

    @property
    def share(self) -> bool:
        """Whether the guest kernel mounts the pod's 9p share (host-path mounts)."""
        return self.kernel_flavor == "clearcri"


# --------------------------------------------------------------------------------------
# Kernel image: bzImage -> vmlinux


_ELF_MAGIC = b"\x7fELF"
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_PAYLOAD_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lz4", _LZ4_LEGACY_MAGIC),
    ("lzma", b"\x5d\x00\x00"),
    ("bzip2", b"BZh"),
)


class Lz4Error(ValueError):
    """Malformed LZ4 data."""


def lz4_block_decompress(src: bytes | memoryview, out: bytearray) -> None:
    """Append the decompression of one LZ4 block to ``out``."""
    base = len(out)
    pos = 0
    end = len(src)
    while pos < end:
        token = src[pos]
        pos += 1
        literals = token >> 4
        if literals == 15:
            while True:
                if pos >= end:
                    raise Lz4Error("truncated literal length")
                extra = src[pos]
                pos += 1
                literals += extra
                if extra != 255:
                    break
        if pos + literals > end:
            raise Lz4Error("literals run past the block")
        out += src[pos : pos + literals]
        pos += literals
        if pos >= end:
            return  # the last sequence has literals only
        if pos + 2 > end:
            raise Lz4Error("truncated match offset")
        offset = src[pos] | (src[pos + 1] << 8)
        pos += 2
        length = token & 15
        if length == 15:
            while True:
                if pos >= end:
                    raise Lz4Error("truncated match length")
                extra = src[pos]
                pos += 1
                length += extra
                if extra != 255:
                    break
        length += 4
        start = len(out) - offset
        if offset == 0 or start < base:
            raise Lz4Error("match offset out of range")
        if length <= offset:
            out += out[start : start + length]
        else:  # overlapping copy repeats the last `offset` bytes
            pattern = bytes(out[start:])
            out += (pattern * (length // offset + 1))[:length]


def lz4_legacy_decompress(data: bytes) -> bytes:
    """Decompress an LZ4 "legacy" stream (the format of the kernel's lz4 payload).

    Trailing bytes that do not form a whole block (the kernel appends the uncompressed
    size) end the stream.
    """
    if not data.startswith(_LZ4_LEGACY_MAGIC):
        raise Lz4Error("not an LZ4 legacy stream")
    view = memoryview(data)
    out = bytearray()
    pos = 4
    while pos + 4 <= len(data):
        if data[pos : pos + 4] == _LZ4_LEGACY_MAGIC:  # concatenated stream
            pos += 4
            continue
        (size,) = struct.unpack_from("<I", data, pos)
        if size == 0 or pos + 4 + size > len(data):
            break
        lz4_block_decompress(view[pos + 4 : pos + 4 + size], out)
        pos += 4 + size
    return bytes(out)


def _decompress_cli(argv: Sequence[str], data: bytes) -> bytes:
    if shutil.which(argv[0]) is None:
        raise GuestBuildError(f"{argv[0]} is needed to decompress the kernel; install it")
    proc = subprocess.run(list(argv), input=data, capture_output=True, check=False)
    # Trailing bytes after the stream make some tools complain; the output still counts.
    if not proc.stdout:
        raise GuestBuildError(f"{argv[0]} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if kind == "bzip2":
        import bz2

        return bz2.BZ2Decompressor().decompress(data)
    if kind == "zstd":
        return _decompress_cli(["zstd", "-d", "-c", "-q"], data)
    if kind == "lz4":
        return lz4_legacy_decompress(data)
    raise GuestBuildError(f"unsupported kernel compression: {kind}")


def _payload_from_header(image: bytes) -> bytes | None:
    """The compressed kernel as located by the x86 boot protocol header, if present."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    (protocol,) = struct.unpack_from("<H", image, 0x206)
    if protocol < 0x208:
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start : start + length]
    if len(payload) != length or length < 8:
        return None
    return payload


def extract_vmlinux(image: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (or ``image`` if it is an ELF already).

    The payload is taken from the boot header when possible (dropping the 4-byte size
    the kernel build appends), else found by scanning for a compression magic.
    """
    if image.startswith(_ELF_MAGIC):
        return image
    candidates: list[tuple[str, bytes, int | None]] = []
    payload = _payload_from_header(image)
    if payload is not None:
        for kind, magic in _PAYLOAD_MAGICS:
            if payload.startswith(magic):
                (size,) = struct.unpack("<I", payload[-4:])
                candidates.append((kind, payload[:-4], size))
                break
    for kind, magic in _PAYLOAD_MAGICS:
        start = image.find(magic)
        while start != -1 and len(candidates) < 16:
            candidates.append((kind, image[start:], None))
            start = image.find(magic, start + 1)
    errors: list[str] = []
    for kind, data, expected_size in candidates:
        try:
            out = _decompress(kind, data)
        except (GuestBuildError, Lz4Error, lzma.LZMAError, zlib.error, OSError, EOFError) as exc:
            errors.append(f"{kind}: {exc}")
            continue
        if not out.startswith(_ELF_MAGIC):
            errors.append(f"{kind}: output is not an ELF file")
        elif expected_size is not None and len(out) != expected_size:
            errors.append(f"{kind}: got {len(out)} bytes, the header says {expected_size}")
        else:
            return out
    detail = "; ".join(errors[:4]) or "no compressed payload found"
    raise GuestBuildError(f"cannot extract vmlinux from the kernel image ({detail})")


# --------------------------------------------------------------------------------------
# ELF inspection (modules' .modinfo, shared-library dependencies)


@dataclass(frozen=True)
class ElfSection:
    name: str
    type: int
    offset: int
    size: int
    link: int


def elf_sections(data: bytes) -> list[ElfSection]:
    """Section headers of a 64-bit little-endian ELF file."""
    if not data.startswith(_ELF_MAGIC) or data[4] != 2 or data[5] != 1:
        raise GuestBuildError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw: list[tuple[int, int, int, int, int]] = []
    for i in range(shnum):
        fields = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        raw.append((fields[0], fields[1], fields[4], fields[5], fields[6]))
    if not raw:
        return []
    names_off, names_size = raw[shstrndx][2], raw[shstrndx][3]
    names = data[names_off : names_off + names_size]
    sections = []
    for name_idx, typ, off, size, link in raw:
        name = names[name_idx : names.index(b"\0", name_idx)].decode()
        sections.append(ElfSection(name, typ, off, size, link))
    return sections


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The key=value pairs of a kernel module's .modinfo section."""
    info: dict[str, list[str]] = {}
    for section in elf_sections(ko):
        if section.name == ".modinfo":
            blob = ko[section.offset : section.offset + section.size]
            for item in blob.split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


def strip_module_signature(ko: bytes) -> bytes:
    """``ko`` without its appended signature (unchanged if it has none)."""
    if not ko.endswith(_MODULE_SIG_MARKER):
        return ko
    # struct module_signature (12 bytes) ends with the big-endian signature length.
    info_end = len(ko) - len(_MODULE_SIG_MARKER)
    (sig_len,) = struct.unpack(">I", ko[info_end - 4 : info_end])
    start = info_end - 12 - sig_len
    if start < 0:
        raise GuestBuildError("malformed module signature")
    return ko[:start]


def module_depends(ko: bytes) -> list[str]:
    deps = modinfo(ko).get("depends", [""])[0]
    return [normalize_module(d) for d in deps.split(",") if d]


def normalize_module(name: str) -> str:
    return name.replace("-", "_")


def module_load_order(
    wanted: Iterable[str],
    depends: Mapping[str, Sequence[str]],
    builtin: Iterable[str] = (),
) -> list[str]:
    """Modules to insmod, dependencies first; built-in modules are skipped.

    ``depends`` maps every available loadable module to its depends= list.
    """
    builtin_set = {normalize_module(m) for m in builtin}
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = normalize_module(name)
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise GuestBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in depends:
            if name in builtin_set:
                state[name] = 2
                return
            raise GuestBuildError(f"kernel module {name} is neither a module nor built in")
        state[name] = 1
        for dep in depends[name]:
            visit(dep, (*chain, name))
        state[name] = 2
        order.append(name)

    for module in wanted:
        visit(module, ())
    return order


@dataclass(frozen=True)
class ElfDynamicInfo:
    needed: tuple[str, ...]
    runpath: tuple[str, ...]
    interpreter: str | None


def elf_dynamic_info(data: bytes) -> ElfDynamicInfo | None:
    """DT_NEEDED, DT_RUNPATH/DT_RPATH and PT_INTERP of an ELF file (None: not dynamic)."""
    sections = elf_sections(data)
    interpreter = None
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 3:  # PT_INTERP
            interpreter = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    dynamic = next((s for s in sections if s.type == 6), None)  # SHT_DYNAMIC
    if dynamic is None:
        return None if interpreter is None else ElfDynamicInfo((), (), interpreter)
    strtab = sections[dynamic.link]
    strings = data[strtab.offset : strtab.offset + strtab.size]

    def string(index: int) -> str:
        return strings[index : strings.index(b"\0", index)].decode()

    needed: list[str] = []
    runpath: list[str] = []
    for off in range(dynamic.offset, dynamic.offset + dynamic.size, 16):
        tag, value = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:
            needed.append(string(value))
        elif tag in (15, 29):  # DT_RPATH, DT_RUNPATH
            runpath.extend(p for p in string(value).split(":") if p)
    return ElfDynamicInfo(tuple(needed), tuple(runpath), interpreter)


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
            if f.read(4) != _ELF_MAGIC:
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


# --------------------------------------------------------------------------------------
# Debian packages


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


def is_pruned_package(name: str) -> bool:
    return name in OS_PRUNED_PACKAGES or name.startswith(OS_PRUNED_PREFIXES)


def resolve_closure(
    roots: Iterable[str],
    show: Callable[[Iterable[str]], Mapping[str, DebPackage]],
    pruned: Callable[[str], bool] = is_pruned_package,
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


def resolve_kernel_package() -> str:
    """The versioned kernel package the cloud meta-package depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise GuestBuildError(f"cannot resolve the package behind {KERNEL_META_PACKAGE}")


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
                _run(
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
                by_hash = {_sha256_file(f): f for f in Path(tmp).glob("*.deb")}
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


# --------------------------------------------------------------------------------------
# Versioning


def hash_inputs(*parts: object) -> str:
    """A stable hash of JSON-able parts (the input hash of one component)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def tree_hash(directory: Path, pattern: str = "*.py") -> str:
    """Hash of every file matching ``pattern`` below ``directory`` (paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob(pattern)):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class BuildInputs:
    """What each component is made from."""

    kernel_package: DebPackage | None
    busybox_package: DebPackage
    os_packages: tuple[DebPackage, ...]
    init_script: bytes
    agent_hash: str
    kernel_flavor: str = DEFAULT_KERNEL_FLAVOR
    kernel_source: DebPackage | None = None
    kernel_config: bytes = b""
    compiler: str = ""
    modules: tuple[str, ...] = GUEST_MODULES
    blk_modules: tuple[str, ...] = GUEST_BLK_MODULES
    launcher: str = AGENT_LAUNCHER
    floor_init: str = FLOOR_INIT

    @property
    def kernel_version(self) -> str:
        if self.kernel_flavor == "clearcri":
            assert self.kernel_source is not None
            return guest_kernel.kernel_release(self.kernel_source.version)
        assert self.kernel_package is not None
        return self.kernel_package.name.removeprefix("linux-image-")

    @property
    def kernel_deb(self) -> DebPackage:
        """The package the kernel comes from (Debian's image, or the source of ours)."""
        pkg = self.kernel_package or self.kernel_source
        assert pkg is not None
        return pkg

    @property
    def kernel_modules(self) -> tuple[str, ...]:
        """Modules the initramfs loads (none: the clearcri kernel has them built in)."""
        return self.modules if self.kernel_flavor == "debian" else ()

    @property
    def kernel_blk_modules(self) -> tuple[str, ...]:
        return self.blk_modules if self.kernel_flavor == "debian" else ()

    def component_hashes(self) -> dict[str, str]:
        if self.kernel_flavor == "clearcri":
            assert self.kernel_source is not None
            kernel: object = [
                "clearcri",
                self.kernel_source.key,
                hashlib.sha256(self.kernel_config).hexdigest(),
                self.compiler,
            ]
        else:
            assert self.kernel_package is not None
            kernel = self.kernel_package.key
        busybox = self.busybox_package.key
        return {
            "kernel": hash_inputs("kernel", RECIPES["kernel"], kernel),
            "initrd": hash_inputs(
                "initrd",
                RECIPES["initrd"],
                kernel if self.kernel_flavor == "debian" else "no modules",
                busybox,
                hashlib.sha256(self.init_script).hexdigest(),
                self.kernel_modules,
                self.kernel_blk_modules,
                STRIP_MODULE_SIGNATURES,
            ),
            "floor_initrd": hash_inputs(
                "floor_initrd", RECIPES["floor_initrd"], busybox, self.floor_init
            ),
            "os_image": hash_inputs(
                "os_image",
                RECIPES["os_image"],
                sorted(p.key for p in self.os_packages),
                self.agent_hash,
                self.launcher,
                importlib.util.MAGIC_NUMBER.hex(),
                PYTHON_PRUNED,
                PYTHON_PRUNED_EXTENSIONS,
                OS_PRUNED_PATHS,
            ),
        }


def combined_version(kernel_version: str, hashes: Mapping[str, str]) -> str:
    digest = hash_inputs([hashes[c] for c in COMPONENTS])
    return f"{kernel_version}+{digest[:16]}"


def load_manifest(guest_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((guest_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    return data


def plan_rebuild(
    manifest: Mapping[str, Any] | None,
    hashes: Mapping[str, str],
    guest_dir: Path,
    force: bool = False,
) -> list[str]:
    """Components whose recorded input hash differs or whose output is missing/altered."""
    recorded: Mapping[str, Any] = (manifest or {}).get("components", {})
    stale = []
    for name in COMPONENTS:
        entry = recorded.get(name)
        output = guest_dir / OUTPUT_FILES[name]
        if (
            force
            or not isinstance(entry, dict)
            or entry.get("input") != hashes[name]
            or not output.is_file()
            or output.stat().st_size != entry.get("size")
        ):
            stale.append(name)
    return stale


def _write_manifest(guest_dir: Path, manifest: Mapping[str, Any]) -> None:
    _atomic_write(guest_dir / MANIFEST_NAME, json.dumps(manifest, indent=2).encode() + b"\n")


# --------------------------------------------------------------------------------------
# Building


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} is not installed") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise GuestBuildError(f"{' '.join(argv[:3])} failed: {' / '.join(tail)}")
    return proc.stdout


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _deb_extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])


def _read_init_script() -> bytes:
    return importlib.resources.files("sandbox").joinpath("guest_init.sh").read_bytes()


def _agent_source_dir() -> Path:
    spec = importlib.util.find_spec("agent")
    if spec is None or not spec.submodule_search_locations:
        raise GuestBuildError("the agent package is not importable; cannot build the OS image")
    return Path(next(iter(spec.submodule_search_locations)))


def _decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if path.name.endswith(".ko.zst"):
        return _decompress_cli(["zstd", "-d", "-c", "-q"], data)
    return data


def _busybox_applets(busybox: Path) -> list[str]:
    """Applet install paths (``bin/sh``, ``usr/sbin/chroot``, ...) of a busybox binary."""
    return sorted(_run([str(busybox), "--list-full"]).split())


class _Builder:
    def __init__(self, guest_dir: Path, inputs: BuildInputs, progress: ProgressFn) -> None:
        self.guest_dir = guest_dir
        self.inputs = inputs
        self.progress = progress
        self.debs = DebCache(guest_dir / "cache" / "debs")
        self.work = Path(tempfile.mkdtemp(prefix="build-", dir=guest_dir))
        self._kernel_root: Path | None = None
        self._busybox: bytes | None = None

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def prefetch(self, components: Iterable[str]) -> None:
        """Download the packages ``components`` need with one apt-get call."""
        wanted: dict[str, DebPackage] = {}
        kernel_package = self.inputs.kernel_package
        for name in components:
            if name in ("kernel", "initrd") and kernel_package is not None:
                wanted[kernel_package.name] = kernel_package
            if name in ("initrd", "floor_initrd"):
                wanted[self.inputs.busybox_package.name] = self.inputs.busybox_package
            if name == "os_image":
                wanted.update((p.name, p) for p in self.inputs.os_packages)
        self.debs.fetch(list(wanted.values()), self.progress)

    def kernel_root(self) -> Path:
        if self._kernel_root is None:
            pkg = self.inputs.kernel_package
            assert pkg is not None
            deb = self.debs.fetch([pkg], self.progress)[pkg.name]
            self.progress(f"unpacking {pkg.name} {pkg.version}")
            self._kernel_root = self.work / "kernel"
            _deb_extract(deb, self._kernel_root)
        return self._kernel_root

    def busybox(self) -> bytes:
        if self._busybox is None:
            pkg = self.inputs.busybox_package
            deb = self.debs.fetch([pkg], self.progress)[pkg.name]
            root = self.work / "busybox"
            _deb_extract(deb, root)
            self._busybox = (root / "bin" / "busybox").read_bytes()
        return self._busybox

    def output(self, component: str) -> Path:
        return self.guest_dir / OUTPUT_FILES[component]

    def staged(self, component: str) -> Path:
        """Where a component is built before it replaces its output."""
        return self.guest_dir / f".{OUTPUT_FILES[component]}.tmp-{os.getpid()}"

    # -- components --------------------------------------------------------------------

    def build_kernel(self) -> None:
        if self.inputs.kernel_flavor == "clearcri":
            self.build_own_kernel()
            return
        version = self.inputs.kernel_version
        bzimage = self.kernel_root() / "boot" / f"vmlinuz-{version}"
        if not bzimage.is_file():
            raise GuestBuildError(f"{bzimage.name} is missing from the kernel package")
        self.progress("extracting vmlinux from the bzImage")
        vmlinux = extract_vmlinux(bzimage.read_bytes())
        self.staged("kernel").write_bytes(vmlinux)
        self.progress(f"kernel: {OUTPUT_FILES['kernel']} ({_mib(len(vmlinux))})")

    def build_own_kernel(self) -> None:
        source = self.inputs.kernel_source
        assert source is not None

        def fetch_source() -> Path:
            return self.debs.fetch([source], self.progress)[source.name]

        builder = guest_kernel.KernelBuilder(
            fetch_source,
            source.version,
            fragment=self.inputs.kernel_config,
            progress=self.progress,
        )
        try:
            vmlinux = builder.build()
        except guest_kernel.KernelBuildError as exc:
            raise GuestBuildError(str(exc)) from exc
        shutil.copyfile(vmlinux, self.staged("kernel"))
        size = _mib(vmlinux.stat().st_size)
        self.progress(f"kernel: {OUTPUT_FILES['kernel']} {self.inputs.kernel_version} ({size})")

    def module_files(self) -> tuple[dict[str, Path], set[str]]:
        moddir = self.kernel_root() / "lib" / "modules" / self.inputs.kernel_version
        if not moddir.is_dir():
            raise GuestBuildError(f"no modules for {self.inputs.kernel_version} in the package")
        files: dict[str, Path] = {}
        for path in moddir.rglob("*.ko*"):
            files[normalize_module(path.name.split(".ko")[0])] = path
        builtin_file = moddir / "modules.builtin"
        builtin: set[str] = set()
        if builtin_file.exists():
            for line in builtin_file.read_text().split():
                builtin.add(normalize_module(line.rsplit("/", 1)[-1].split(".ko")[0]))
        return files, builtin

    def build_initrd(self) -> None:
        modules, blk_modules = self.inputs.kernel_modules, self.inputs.kernel_blk_modules
        files, builtin = self.module_files() if modules or blk_modules else ({}, set())
        contents: dict[str, bytes] = {}
        depends: dict[str, list[str]] = {}
        pending = [normalize_module(m) for m in (*modules, *blk_modules)]
        while pending:
            name = pending.pop()
            if name in depends or name not in files:
                continue
            data = _decompress_module(files[name])
            depends[name] = module_depends(data)
            contents[name] = strip_module_signature(data) if STRIP_MODULE_SIGNATURES else data
            pending.extend(depends[name])
        order = module_load_order(modules, depends, builtin)
        blk_order = [m for m in module_load_order(blk_modules, depends, builtin) if m not in order]
        self.progress(f"initramfs: {len(order)} modules: {' '.join(order)}")

        ir = _base_initramfs(self.busybox(), INIT_APPLETS)
        ir.add_dir("newroot")
        ir.add_dir("lib/modules")
        for name in (*order, *blk_order):
            ir.add_file(f"lib/modules/{name}.ko", contents[name])
        ir.add_file("etc/clearcri/modules", "".join(f"{m}\n" for m in order).encode())
        ir.add_file("etc/clearcri/modules.blk", "".join(f"{m}\n" for m in blk_order).encode())
        ir.add_file("etc/clearcri/kernel-version", f"{self.inputs.kernel_version}\n".encode())
        ir.add_file("init", self.inputs.init_script, 0o755)
        data = ir.to_bytes()
        self.staged("initrd").write_bytes(data)
        self.progress(f"initramfs: {OUTPUT_FILES['initrd']} ({_mib(len(data))})")

    def build_floor_initrd(self) -> None:
        ir = _base_initramfs(self.busybox(), ("sh", "echo", "poweroff", "reboot"))
        ir.add_file("init", self.inputs.floor_init.encode(), 0o755)
        data = ir.to_bytes()
        self.staged("floor_initrd").write_bytes(data)
        self.progress(f"floor initramfs: {OUTPUT_FILES['floor_initrd']} ({_mib(len(data))})")

    def build_os_image(self, input_hash: str) -> None:
        packages = self.inputs.os_packages
        debs = self.debs.fetch(packages, self.progress)
        root = self.work / "os-root"
        root.mkdir()
        self.progress(f"unpacking {len(packages)} packages for the guest OS image")
        for pkg in packages:
            _deb_extract(debs[pkg.name], root)
        _merge_usr(root)
        self.progress("pruning the guest OS image")
        _prune_os_root(root)
        _install_busybox_applets(root)
        _install_agent(root, _agent_source_dir(), self.inputs.launcher)
        _write_etc(root)
        self.progress("precompiling Python bytecode")
        _compile_python(root)
        problems = missing_libraries(root)
        if problems:
            shown = "\n  ".join(problems[:20])
            raise GuestBuildError(f"guest OS image has unresolved libraries:\n  {shown}")
        self.progress("making the erofs image")
        tmp = self.staged("os_image")
        image_uuid = str(uuid.UUID(input_hash[:32]))
        _run(
            [
                "mkfs.erofs",
                "--quiet",
                "-Enoinline_data",
                "-T0",
                f"-U{image_uuid}",
                "--all-root",
                "-x-1",
                str(tmp),
                str(root),
            ]
        )
        size = tmp.stat().st_size
        os.truncate(tmp, -(-size // OS_IMAGE_ALIGN) * OS_IMAGE_ALIGN)
        os.chmod(tmp, 0o444)
        padded = _mib(tmp.stat().st_size)
        self.progress(
            f"guest OS image: {OUTPUT_FILES['os_image']} ({_mib(size)}, padded to {padded})"
        )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _base_initramfs(busybox: bytes, applets: Iterable[str]) -> Initramfs:
    ir = Initramfs()
    for directory in ("dev", "proc", "sys", "run", "tmp", "etc"):
        ir.add_dir(directory)
    ir.add_char_device("dev/console", 5, 1, 0o600)
    ir.add_char_device("dev/null", 1, 3, 0o666)
    ir.add_file("bin/busybox", busybox, 0o755)
    for applet in applets:
        ir.add_symlink(f"bin/{applet}", "busybox")
    return ir


def _merge_usr(root: Path) -> None:
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _prune_os_root(root: Path) -> None:
    for rel in OS_PRUNED_PATHS:
        _remove(root / rel)
    pylib = root / PYTHON_LIB
    for rel in PYTHON_PRUNED:
        _remove(pylib / rel)
    for config in pylib.glob("config-*"):
        _remove(config)
    dynload = pylib / "lib-dynload"
    for name in PYTHON_PRUNED_EXTENSIONS:
        for ext in dynload.glob(f"{name}.cpython-*.so"):
            ext.unlink()
    for cache in list(root.rglob("__pycache__")):
        _remove(cache)
    for pattern in ("*.a", "*.la"):  # static libraries, libtool archives
        for archive in list((root / "usr" / "lib").rglob(pattern)):
            archive.unlink()
    _remove(root / "usr" / "lib" / "x86_64-linux-gnu" / "pkgconfig")
    for tests in list(pylib.rglob("tests")):
        if tests.is_dir():
            _remove(tests)


def _install_busybox_applets(root: Path) -> None:
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


def _install_agent(root: Path, source: Path, launcher: str) -> None:
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


def _write_etc(root: Path) -> None:
    for directory in ("run", "tmp", "proc", "sys", "dev", "mnt", "root", "etc", "var"):
        (root / directory).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    etc = root / "etc"
    for name in ("hostname", "hosts", "resolv.conf"):
        _remove(etc / name)
        (etc / name).symlink_to(f"/run/clearcri/etc/{name}")
    _remove(etc / "mtab")
    (etc / "mtab").symlink_to("/proc/self/mounts")
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for name, target in (("run", "/run"), ("tmp", "/tmp"), ("lock", "/run/lock")):
        _remove(root / "var" / name)
        (root / "var" / name).symlink_to(target)


def _compile_python(root: Path) -> None:
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


@contextlib.contextmanager
def _build_lock(guest_dir: Path) -> Iterator[None]:
    with (guest_dir / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def collect_inputs(progress: ProgressFn, kernel_flavor: str = DEFAULT_KERNEL_FLAVOR) -> BuildInputs:
    """Resolve everything the build depends on (apt metadata, init script, agent source)."""
    if kernel_flavor not in KERNEL_FLAVORS:
        raise GuestBuildError(
            f"unknown guest kernel {kernel_flavor!r}: choose {' or '.join(KERNEL_FLAVORS)}"
        )
    progress("resolving packages")
    if kernel_flavor == "clearcri":
        kernel_name = guest_kernel.SOURCE_PACKAGE
    else:
        kernel_name = resolve_kernel_package()
    base = apt_show([kernel_name, BUSYBOX_PACKAGE])
    for name in (kernel_name, BUSYBOX_PACKAGE):
        if name not in base:
            raise GuestBuildError(f"package {name} is not available from apt")
    os_packages = tuple(resolve_closure(OS_ROOT_PACKAGES, apt_show))
    own = kernel_flavor == "clearcri"
    return BuildInputs(
        kernel_package=None if own else base[kernel_name],
        busybox_package=base[BUSYBOX_PACKAGE],
        os_packages=os_packages,
        init_script=_read_init_script(),
        agent_hash=tree_hash(_agent_source_dir()),
        kernel_flavor=kernel_flavor,
        kernel_source=base[kernel_name] if own else None,
        kernel_config=guest_kernel.config_fragment() if own else b"",
        compiler=guest_kernel.compiler_version() if own else "",
    )


def build_guest(
    guest_dir: Path = DEFAULT_GUEST_DIR,
    *,
    progress: ProgressFn | None = None,
    force: bool = False,
    kernel: str = DEFAULT_KERNEL_FLAVOR,
) -> GuestAssets:
    """Build (or bring up to date) the guest assets under ``guest_dir`` with the
    ``kernel`` flavor (see KERNEL_FLAVORS)."""
    report: ProgressFn = progress or (lambda _line: None)
    guest_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(guest_dir):
        _remove_leftovers(guest_dir)
        inputs = collect_inputs(report, kernel)
        hashes = inputs.component_hashes()
        manifest = load_manifest(guest_dir)
        stale = plan_rebuild(manifest, hashes, guest_dir, force)
        components: dict[str, Any] = dict((manifest or {}).get("components", {}))
        if not stale:
            report("guest assets are up to date")
        builder = _Builder(guest_dir, inputs, report)
        try:
            # Everything is built to temporary names first and only then renamed into
            # place, so a VM never boots a new kernel with the old initramfs's modules.
            builder.prefetch(stale)
            for name in stale:
                if name == "kernel":
                    builder.build_kernel()
                elif name == "initrd":
                    builder.build_initrd()
                elif name == "floor_initrd":
                    builder.build_floor_initrd()
                else:
                    builder.build_os_image(hashes[name])
            for name in stale:
                staged = builder.staged(name)
                components[name] = {
                    "input": hashes[name],
                    "file": OUTPUT_FILES[name],
                    "size": staged.stat().st_size,
                }
                os.replace(staged, builder.output(name))
        finally:
            builder.close()
            _remove_leftovers(guest_dir)
        _write_manifest(guest_dir, _manifest(inputs, components, hashes, complete=True))
        kept = [inputs.busybox_package, *inputs.os_packages]
        if inputs.kernel_package is not None:
            kept.append(inputs.kernel_package)
        builder.debs.prune(kept)
    return locate_guest(guest_dir)


def _remove_leftovers(guest_dir: Path) -> None:
    """Work directories and temporary outputs of builds that did not finish."""
    for path in [*guest_dir.glob("build-*"), *guest_dir.glob(".*.tmp-*")]:
        _remove(path)


def _manifest(
    inputs: BuildInputs,
    components: Mapping[str, Any],
    hashes: Mapping[str, str],
    *,
    complete: bool,
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "complete": complete,
        "kernel_version": inputs.kernel_version,
        "kernel_flavor": inputs.kernel_flavor,
        "version": combined_version(inputs.kernel_version, hashes),
        # the kernel's package: Debian's image, or the source ours is built from
        "kernel_package": inputs.kernel_deb.key,
        "busybox_package": inputs.busybox_package.key,
        "os_packages": sorted(p.key for p in inputs.os_packages),
        "agent_hash": inputs.agent_hash,
        "components": dict(components),
    }


def locate_guest(guest_dir: Path = DEFAULT_GUEST_DIR) -> GuestAssets:
    """The built guest assets; raises GuestAssetsMissing if they are not (fully) built."""
    hint = "run `clearcri guest build`"
    manifest = load_manifest(guest_dir)
    if manifest is None or not manifest.get("complete"):
        raise GuestAssetsMissing(f"guest assets are not built in {guest_dir}: {hint}")
    components = manifest.get("components", {})
    paths: dict[str, Path] = {}
    for name in COMPONENTS:
        entry = components.get(name)
        path = guest_dir / OUTPUT_FILES[name]
        if not isinstance(entry, dict) or not path.is_file():
            raise GuestAssetsMissing(f"guest asset {path} is missing: {hint}")
        if path.stat().st_size != entry.get("size"):
            raise GuestAssetsMissing(f"guest asset {path} does not match its manifest: {hint}")
        paths[name] = path
    return GuestAssets(
        kernel=paths["kernel"],
        initrd=paths["initrd"],
        os_image=paths["os_image"],
        floor_initrd=paths["floor_initrd"],
        kernel_version=str(manifest["kernel_version"]),
        version=str(manifest["version"]),
        kernel_flavor=str(manifest.get("kernel_flavor", "debian")),
    )
