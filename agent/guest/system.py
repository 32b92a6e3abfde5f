"""Guest system calls and facts: mounts, hostname, clock, power, boot info, memory.

ctypes is imported on first use only: nothing here runs before the host's hello.
"""

from __future__ import annotations

import os
import time

from agent.mountapi import libc as libc

TYPE_CHECKING = False
if TYPE_CHECKING:
    pass

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2
PR_SET_CHILD_SUBREAPER = 36
RB_POWER_OFF = 0x4321FEDC


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    lib = libc()
    _check(
        lib.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def umount(target: str, *, detach: bool = False) -> None:
    _check(libc().umount2(target.encode(), MNT_DETACH if detach else 0), f"umount {target}")


def set_child_subreaper() -> None:
    _check(libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


#: personality(2) flag: programs started from now on are laid out at fixed addresses
ADDR_NO_RANDOMIZE = 0x0040000
#: personality(2) argument that only reads the current personality
PERSONALITY_QUERY = 0xFFFFFFFF


def start_helpers_unrandomized() -> None:
    """Have every program this process starts from now on (crun, nsexec, busybox) laid
    out at the same addresses each time, its own layout unchanged. Under TCG a VM's
    QEMU keeps translated code per guest address: a helper laid out at random is
    translated anew at each start (crun create ~50 ms more, docs/benchmarks.md).
    Containers get the randomization back: crun applies the OCI personality the agent
    gives every container, nsexec resets it before the program."""
    _set_personality(personality() | ADDR_NO_RANDOMIZE)


def personality() -> int:
    """This process's personality(2) value."""
    return _set_personality(PERSONALITY_QUERY)


def _set_personality(value: int) -> int:
    import ctypes

    result: int = libc().personality(ctypes.c_ulong(value))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"personality: {os.strerror(err)}")
    return result


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(libc().sethostname(raw, len(raw)), "sethostname")


def set_clock(unix_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)


def power_off() -> None:
    os.sync()
    _check(libc().reboot(RB_POWER_OFF), "reboot(RB_POWER_OFF)")


def mount_points() -> set[str]:
    """Mount points currently visible to the agent."""
    points: set[str] = set()
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1:
                points.add(parts[1].replace("\\040", " "))
    return points


def mount_options(target: str) -> str | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 3 and parts[1] == target:
                return parts[3]
    return None


def find_pmem_device(pci_path: str, *, timeout: float = 5.0) -> str:
    """/dev/pmemN of the virtio-pmem device behind PCI address ``pci_path``."""
    base = f"/sys/devices/pci0000:00/{pci_path}"
    deadline = time.monotonic() + timeout
    while True:
        found = _search_pmem(base)
        if found is not None and os.path.exists(f"/dev/{found}"):
            return f"/dev/{found}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"no pmem block device appeared under {base} in {timeout:.0f} s")
        time.sleep(0.02)


def _search_pmem(base: str) -> str | None:
    if not os.path.isdir(base):
        return None
    for root, dirs, _files in os.walk(base):
        if os.path.basename(root) == "block":
            for name in dirs:
                if name.startswith("pmem"):
                    return name
        # Do not wander into sibling subsystems through symlinks.
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return None


def read_boot_times(path: str) -> dict[str, float]:
    times: dict[str, float] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    try:
                        times[parts[0]] = float(parts[1])
                    except ValueError:
                        continue
    except OSError:
        pass
    return times


def uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.clock_gettime(time.CLOCK_BOOTTIME)


def read_flag(path: str) -> bool | None:
    try:
        with open(path) as f:
            first = f.readline().strip()
    except OSError:
        return None
    return first == "1" if first in ("0", "1") else None


def meminfo() -> dict[str, int]:
    """/proc/meminfo values in KiB."""
    values: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                try:
                    values[key] = int(parts[0])
                except ValueError:
                    continue
    return values


def cpu_times() -> list[int]:
    """The aggregate "cpu" line of /proc/stat (USER_HZ ticks)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                return [int(v) for v in line.split()[1:]]
    return []


def write_file(path: str, text: str, mode: int = 0o644) -> None:
    """Write atomically (temp file + rename) so readers never see half a file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(text.encode())
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.rename(tmp, path)


RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def add_entropy(data: bytes) -> None:
    """Mix host-provided randomness into the kernel pool, credit it and reseed the
    CRNG now: VMs cloned from one template start with identical random state."""
    import fcntl
    import struct

    request = struct.pack("ii", len(data) * 8, len(data)) + data
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, request)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)
