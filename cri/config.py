"""Daemon configuration: /etc/clearcri/config.toml.

Every key, its default and its meaning are listed in docs/config.md; an unknown key or
a value of the wrong type is an error that names the key, so typos never pass silently.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.node import SandboxConfig
from sandbox.vm import MAX_IMAGE_SLOTS, MAX_TCG_TB_SIZE_MIB

DEFAULT_CONFIG_PATH = Path("/etc/clearcri/config.toml")


class ConfigError(Exception):
    """The configuration file is unreadable or wrong; the message names the key."""


@dataclass
class DaemonConfig:
    """The `[daemon]` table."""

    socket: Path = Path("/run/clearcri/clearcri.sock")
    state_dir: Path = Path("/var/lib/clearcri")
    run_dir: Path = Path("/run/clearcri")
    log_dir: Path = Path("/var/log/clearcri")
    log_level: str = "info"
    # Image used for nothing inside the VM but reported to kubelet as the pause image.
    sandbox_image: str = "registry.k8s.io/pause:3.10"
    cgroup_driver: str = "cgroupfs"
    # Serve the `host` runtime handler (pods with host namespaces or privileged, run on
    # the host without a VM: sandbox/hostpod.py); false refuses such pods.
    host_pods: bool = True


@dataclass
class StreamingConfig:
    """The `[streaming]` table: exec/attach/port-forward server."""

    address: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port at start


@dataclass
class MetricsConfig:
    """The `[metrics]` table."""

    address: str = "127.0.0.1"
    port: int = 9464
    enabled: bool = True


@dataclass
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    vm: SandboxConfig = field(default_factory=SandboxConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    registry: dict[str, Any] = field(default_factory=dict)

    def finish(self, vm_keys: frozenset[str] = frozenset()) -> Config:
        """Derive dependent defaults: unless set, the VM run dir lives under the daemon's
        run dir and the guest assets under its state dir."""
        if "run_root" not in vm_keys:
            self.vm.run_root = self.daemon.run_dir / "sandboxes"
        if "guest_dir" not in vm_keys:
            self.vm.guest_dir = self.daemon.state_dir / "guest"
        if self.daemon.cgroup_driver not in ("cgroupfs", "systemd"):
            raise ConfigError("daemon.cgroup_driver must be 'cgroupfs' or 'systemd'")
        if self.vm.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError("vm.accel must be 'auto', 'kvm' or 'tcg'")
        if self.vm.small_pods not in ("grow", "refuse"):
            raise ConfigError("vm.small_pods must be 'grow' or 'refuse'")
        if self.vm.jail_first_id < 1 or self.vm.jail_ids < 1:
            raise ConfigError("vm.jail_first_id and vm.jail_ids must be 1 or more")
        if self.vm.jail_first_id + self.vm.jail_ids > 2**32 - 1:
            raise ConfigError("vm.jail_first_id + vm.jail_ids must stay below 2^32 - 1")
        if not 0 <= self.vm.image_slots <= MAX_IMAGE_SLOTS:
            raise ConfigError(f"vm.image_slots must be 0 to {MAX_IMAGE_SLOTS}")
        if self.vm.max_clone_memory_mib < 0:
            raise ConfigError("vm.max_clone_memory_mib must be 0 (automatic) or more")
        if self.vm.standby < 0 or self.vm.standby_burst < 0:
            raise ConfigError("vm.standby and vm.standby_burst must be 0 or more")
        if not 1 <= self.vm.tcg_tb_size_mib <= MAX_TCG_TB_SIZE_MIB:
            # QEMU reads 0 as its own default, 1 GiB, which no pod's budget pays for
            raise ConfigError(f"vm.tcg_tb_size_mib must be 1 to {MAX_TCG_TB_SIZE_MIB}")
        if self.vm.jit_flush_idle_s < 0:
            raise ConfigError("vm.jit_flush_idle_s must be 0 (never) or more seconds")
        if self.vm.ksm_pages_to_scan < 0:
            raise ConfigError("vm.ksm_pages_to_scan must be 0 (leave as is) or more")
        if not 0 <= self.metrics.port <= 65535:
            raise ConfigError("metrics.port must be 0 (any free port) to 65535")
        return self


def _fill(obj: Any, table: dict[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in table.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {where}.{key} (known keys: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            if not isinstance(value, dict):
                raise ConfigError(f"[{where}.{key}] must be a table")
            _fill(current, value, f"{where}.{key}")
            continue
        if isinstance(current, list) and "list[Path]" in str(fields[key].type):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.{key} must be a list of path strings")
            value = [Path(v) for v in value]
        elif isinstance(current, Path) or "Path" in str(fields[key].type):
            if not isinstance(value, str):
                raise ConfigError(f"{where}.{key} must be a path string")
            value = Path(value)
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key} must be true or false")
        elif isinstance(current, int | float) and not isinstance(current, bool):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}.{key} must be a number")
            if isinstance(current, int) and not isinstance(value, int):
                raise ConfigError(f"{where}.{key} must be an integer")
        elif isinstance(current, str) and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string")
        setattr(obj, key, value)


def load_config(path: Path | None) -> Config:
    """Read ``path`` (None or a missing default path: all defaults)."""
    config = Config()
    if path is None:
        return config.finish()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if path == DEFAULT_CONFIG_PATH:
            return config.finish()
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    tables = {
        "daemon": config.daemon,
        "vm": config.vm,
        "streaming": config.streaming,
        "metrics": config.metrics,
    }
    for name, value in data.items():
        if name == "registry":
            if not isinstance(value, dict):
                raise ConfigError("[registry] must be a table")
            config.registry = value
            continue
        if name not in tables:
            raise ConfigError(f"unknown table [{name}] (known: {', '.join([*tables, 'registry'])})")
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")
        _fill(tables[name], value, name)
    vm_table = data.get("vm", {})
    return config.finish(frozenset(vm_table) if isinstance(vm_table, dict) else frozenset())
