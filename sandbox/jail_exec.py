"""Enter a VMM jail and exec the VMM: the program a jailed QEMU starts as.

Run as root with the interpreter's isolated, site-less mode (``python3 -I -S
jail_exec.py KEY=VALUE... -- qemu ...``, the arguments sandbox/jail.py writes): it
imports nothing but ``ctypes`` (not even ``json``, whose regular expressions would
double its start-up), so it is done in under 30 ms. In order:

1. new mount, IPC and network namespaces (the VMM reaches the network only through
   the tap descriptor it inherits, and its sockets are files);
2. every mount becomes a slave: what the daemon mounts later below a writable
   directory (a pod's shared host paths, hot-plugged images) still appears here;
3. a new root on a small tmpfs holding only the binds the spec names, at the same
   paths as on the host (``/usr`` and the loader cache read-only, the guest kernel and
   OS image read-only, the VM's own directory writable, a few device nodes, a /proc
   that shows the VMM's own processes only), the tmpfs itself read-only;
   ``pivot_root`` into it, the old root detached;
4. every capability not named dropped from the bounding set; no supplementary groups
   (but the one that owns /dev/kvm, where named); the VMM's own uid and gid; the
   named capabilities kept as ambient ones (nothing else survives exec); no new
   privileges ever;
5. exec.

Between 3 and 4, with ``merge=1``: all of the process's memory mergeable by KSM, which
exec keeps (``PR_SET_MEMORY_MERGE``, Linux 6.4 or later; before, QEMU marks only the
guest's RAM). With ``thp=off``: no transparent huge pages for the process, which exec
keeps too (``PR_SET_THP_DISABLE``), though QEMU asks for them on its guest RAM and
translation buffers: a 2 MiB page for every 2 MiB range the guest or QEMU touches at
all (jail.py says when).

Any failure is printed to stderr (the VMM's log) and exits 126.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000
MNT_DETACH = 2
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_SET_MEMORY_MERGE = 67
PR_SET_THP_DISABLE = 41
EINVAL = 22
CAPABILITY_VERSION_3 = 0x20080522
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
PROC_OPTIONS = "hidepid=invisible,subset=pid"
#: top-level names a merged-/usr system has as links into /usr
USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    pass


def check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    check(
        libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype or ''} at {target}",
    )


def make_mount_point(root: str, path: str, *, directory: bool) -> str:
    """The place ``path`` of the host takes below ``root`` (directories and an empty
    file made as needed, never a symlink followed)."""
    target = root + path
    os.makedirs(target if directory else os.path.dirname(target), exist_ok=True)
    if not directory and not os.path.lexists(target):
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
    return target


def bind(root: str, path: str, *, writable: bool) -> None:
    target = make_mount_point(root, path, directory=os.path.isdir(path))
    mount(path, target, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if writable else MS_RDONLY)
    if not path.startswith("/dev/"):
        flags |= MS_NODEV
    mount(None, target, None, flags)


class Spec:
    """What to build, from ``key=value`` arguments (list keys repeat)."""

    LISTS = ("readonly", "writable", "device", "group", "capability")

    def __init__(self, args: list[str]) -> None:
        values: dict[str, str] = {}
        lists: dict[str, list[str]] = {key: [] for key in self.LISTS}
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep:
                raise JailError(f"bad argument {arg!r}")
            if key in lists:
                lists[key].append(value)
            else:
                values[key] = value
        try:
            self.uid = int(values["uid"])
            self.gid = int(values["gid"])
            self.root = values["root"]
            self.workdir = values["workdir"]
        except (KeyError, ValueError) as exc:
            raise JailError(f"missing or bad uid, gid, root or workdir: {exc}") from exc
        self.readonly = lists["readonly"]
        self.writable = lists["writable"]
        self.devices = lists["device"]
        self.groups = [int(g) for g in lists["group"]]
        self.capabilities = [int(c) for c in lists["capability"]]
        self.merge = values.get("merge") == "1"
        self.huge_pages = values.get("thp") != "off"


def build_root(spec: Spec) -> None:
    root = spec.root
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755")
    for name in USR_LINKS:
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), f"{root}/{name}")
        elif os.path.isdir(host) and name in ("lib", "lib64"):
            bind(root, host, writable=False)
    for path in spec.readonly:
        bind(root, path, writable=False)
    for path in spec.writable:
        bind(root, path, writable=True)
    for path in spec.devices:
        bind(root, path, writable=True)
    # QEMU's 9p server reaches files through /proc/self/fd: a proc of its own that
    # shows only processes of its own id and nothing but their directories
    os.mkdir(f"{root}/proc")
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, PROC_OPTIONS)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(root)
    arch = os.uname().machine
    if arch not in SYS_PIVOT_ROOT:
        raise JailError(f"no pivot_root syscall number known for {arch}")
    check(libc.syscall(SYS_PIVOT_ROOT[arch], b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_privileges(uid: int, gid: int, groups: list[int], keep: list[int], last_cap: int) -> None:
    for cap in range(last_cap + 1):
        if cap not in keep:
            check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "keep capabilities")
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    mask = [0, 0]
    for cap in keep:
        mask[cap // 32] |= 1 << (cap % 32)
    header = CapHeader(CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)(*(CapData(m, m, m) for m in mask))
    check(libc.capset(ctypes.byref(header), data), "set capabilities")
    for cap in keep:
        check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), f"ambient {cap}")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no new privileges")


def enter(spec: Spec) -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET), "new namespaces")
    mount(None, "/", None, MS_REC | MS_SLAVE)
    build_root(spec)
    os.chdir(spec.workdir)
    merge_refused = spec.merge and libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0
    if merge_refused and ctypes.get_errno() != EINVAL:  # EINVAL: a kernel before 6.4
        check(-1, "make the VMM's memory mergeable")
    if not spec.huge_pages:
        check(libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0), "turn transparent huge pages off")
    drop_privileges(spec.uid, spec.gid, spec.groups, spec.capabilities, last_cap)


def find_program(name: str) -> str:
    """``name`` looked up on PATH now: nothing can be imported once in the jail (this
    interpreter's own library is outside it)."""
    if "/" in name:
        return name
    for directory in os.environ.get("PATH", "/usr/bin:/bin").split(":"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    raise JailError(f"{name} not found on PATH")


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: jail_exec.py KEY=VALUE... -- PROGRAM [ARG...]", file=sys.stderr)
        return 2
    split = argv.index("--")
    try:
        spec = Spec(argv[1:split])
        program = find_program(argv[split + 1])
        enter(spec)
        os.execv(program, argv[split + 1 :])
    except (JailError, OSError, ValueError) as exc:
        print(f"clearcri jail: {exc}", file=sys.stderr)
    return 126


if __name__ == "__main__":
    sys.exit(main(sys.argv))
