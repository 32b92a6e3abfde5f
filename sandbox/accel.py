"""Choose the accelerator a pod VM can really run on.

/dev/kvm existing is not enough: some hosts expose a paravirtual KVM (``kvm_pvm``) on
which a normal guest kernel hangs early in boot. Detection therefore never boots a
guest without a deadline: cheap checks first, then (only when they pass) one probe
boot of the floor initramfs under KVM that must print its marker within a timeout.
The verdict is cached per host kernel and QEMU binary.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox.guest import GuestAssets

FLOOR_MARKER = b"clearcri-floor-ready"
KVM_PROBE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator to use, and why."""

    accel: str  # "kvm" or "tcg"
    reason: str


def _kvm_static_verdict(
    dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")
) -> str:
    """Return an empty string when KVM might work, else why it cannot."""
    if not dev.exists():
        return f"{dev} does not exist"
    if not os.access(dev, os.R_OK | os.W_OK):
        return f"{dev} is not readable and writable by this process"
    if (sys_module / "kvm_pvm").exists():
        return "host KVM is the paravirtual kvm_pvm, which hangs normal guest kernels"
    return ""


def probe_kvm(qemu: str, assets: GuestAssets, timeout: float = KVM_PROBE_TIMEOUT_S) -> str:
    """Boot the floor initramfs under KVM; return "" on success, else the failure."""
    cmd = [
        qemu,
        "-M",
        "q35,sata=off,smbus=off,usb=off,vmport=off,graphics=off",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        str(assets.kernel),
        "-initrd",
        str(assets.floor_initrd),
        "-append",
        "console=ttyS0 quiet panic=-1",
    ]
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return f"a KVM guest did not finish booting within {timeout:.0f} s"
    except OSError as exc:
        return f"cannot run {qemu}: {exc}"
    if FLOOR_MARKER in proc.stdout:
        return ""
    tail = (proc.stderr or proc.stdout)[-300:].decode(errors="replace").strip()
    return f"KVM probe guest exited with {proc.returncode} without booting: {tail}"


def choose_accel(
    requested: str,
    *,
    qemu: str,
    assets: GuestAssets,
    cache_file: Path | None = None,
) -> AccelChoice:
    """Resolve ``requested`` ("auto", "kvm" or "tcg") to the accelerator to use.

    "kvm" is honoured only if KVM really works (else ValueError), "tcg" always,
    "auto" prefers KVM when it works.
    """
    if requested not in ("auto", "kvm", "tcg"):
        raise ValueError(f"accel must be auto, kvm or tcg, not {requested!r}")
    if requested == "tcg":
        return AccelChoice("tcg", "configured")
    key = f"{platform.release()}|{qemu}|{assets.version}"
    if cache_file is not None and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                choice = AccelChoice(cached["accel"], cached["reason"])
                return _honour(requested, choice)
        except (OSError, ValueError, KeyError):
            pass
    why_not = _kvm_static_verdict()
    if not why_not:
        started = time.monotonic()
        why_not = probe_kvm(qemu, assets)
        elapsed = time.monotonic() - started
        if not why_not:
            choice = AccelChoice("kvm", f"KVM probe booted in {elapsed:.2f} s")
        else:
            choice = AccelChoice("tcg", why_not)
    else:
        choice = AccelChoice("tcg", why_not)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, **asdict(choice)}))
        tmp.replace(cache_file)
    return _honour(requested, choice)


def _honour(requested: str, choice: AccelChoice) -> AccelChoice:
    if requested == "kvm" and choice.accel != "kvm":
        raise ValueError(f"accel = kvm was configured but KVM cannot run guests: {choice.reason}")
    return choice
