"""Where the agent keeps its state and how it runs crun (overridable for local tests)."""

from __future__ import annotations

import os

#: Namespaces a pod can own besides mount and PID, as /proc/<pid>/ns names.
POD_NAMESPACE_KINDS = ("ipc", "net", "uts")
OCI_NAMESPACE_TYPES = {"ipc": "ipc", "net": "network", "uts": "uts"}


class Settings:
    """Paths and modes of one agent instance.

    In the VM every default holds. To run the agent on an ordinary host (tests), point
    ``run_dir`` somewhere private and use ``cgroup_mode="disabled"``.

    On the host (the ``host`` runtime handler, sandbox/hostpod.py) the agent listens on
    a unix socket (``listen_path``, one host connection at a time), puts containers
    under ``cgroup_parent`` with cgroup v1 or v2 (``cgroup_mode`` "v1" or "v2"), and
    gives pod-IPC containers ``shm_dir`` as their /dev/shm.

    ``pod_namespaces`` names the agent's namespaces that belong to the pod alone
    ("ipc", "net", "uts"): containers join them by path, which is what lets crun apply
    the pod's IPC and network sysctls. In the VM all three are the pod's; a host pod's
    agent lists only those it did not share with the host.

    ``layer_fs`` is where a container's writable layer lives: "tmpfs" (the VM: one
    tmpfs per container, so that a full layer is that container's alone) or "dir" (a
    directory in the run dir: a host pod's layer on the host's disk).

    ``host_mntns_fd`` (host pods) is a descriptor of the host's mount namespace: host
    paths are cloned from there at container creation (agent/guest/hostmounts.py).
    """

    def __init__(
        self,
        *,
        run_dir: str = "/run/clearcri",
        cgroup_mode: str = "v2",
        cgroup_root: str = "/sys/fs/cgroup",
        crun: str = "crun",
        busybox: str = "busybox",
        power_off: bool = True,
        port_name: str | None = None,
        port_path: str | None = None,
        port_fd: int | None = None,
        listen_path: str | None = None,
        cgroup_parent: str = "/clearcri",
        shm_dir: str = "/dev/shm",
        pod_namespaces: tuple[str, ...] = POD_NAMESPACE_KINDS,
        host_mntns_fd: int | None = None,
        layer_fs: str = "tmpfs",
        nsexec: str | None = None,
        unrandomized_helpers: bool = False,
    ) -> None:
        if cgroup_mode not in ("v2", "v1", "disabled"):
            raise ValueError(f"cgroup mode must be 'v2', 'v1' or 'disabled', not {cgroup_mode!r}")
        if not cgroup_parent.startswith("/"):
            raise ValueError(f"cgroup parent {cgroup_parent!r} is not an absolute path")
        if layer_fs not in ("tmpfs", "dir"):
            raise ValueError(f"layer fs must be 'tmpfs' or 'dir', not {layer_fs!r}")
        self.run_dir = run_dir.rstrip("/") or "/"
        self.layer_fs = layer_fs
        self.cgroup_mode = cgroup_mode
        self.cgroup_root = cgroup_root
        self.crun = crun
        #: the exec helper (nsexec.c, built into the guest OS image beside the agent);
        #: "" or a missing file: every exec goes through crun
        self.nsexec = default_nsexec() if nsexec is None else nsexec
        self.busybox = busybox
        self.power_off = power_off
        self.port_name = port_name
        self.port_path = port_path
        self.port_fd = port_fd
        self.listen_path = listen_path
        self.cgroup_parent = cgroup_parent.rstrip("/") or "/"
        self.shm_dir = shm_dir
        unknown = set(pod_namespaces) - set(POD_NAMESPACE_KINDS)
        if unknown:
            raise ValueError(
                f"pod namespaces must be among {', '.join(POD_NAMESPACE_KINDS)}, "
                f"not {', '.join(sorted(unknown))}"
            )
        self.pod_namespaces = tuple(k for k in POD_NAMESPACE_KINDS if k in pod_namespaces)
        self.host_mntns_fd = host_mntns_fd
        #: start crun, nsexec and the other helpers at fixed addresses (a VM under TCG:
        #: system.start_helpers_unrandomized); containers are laid out at random anyway
        self.unrandomized_helpers = unrandomized_helpers

    def pod_namespace_paths(self) -> dict[str, str]:
        """OCI namespace type -> path of the agent's namespace, for those the pod owns."""
        pid = os.getpid()
        return {OCI_NAMESPACE_TYPES[k]: f"/proc/{pid}/ns/{k}" for k in self.pod_namespaces}

    @property
    def images_dir(self) -> str:
        return f"{self.run_dir}/images"

    @property
    def containers_dir(self) -> str:
        return f"{self.run_dir}/containers"

    @property
    def etc_dir(self) -> str:
        return f"{self.run_dir}/etc"

    @property
    def crun_root(self) -> str:
        return f"{self.run_dir}/crun"

    @property
    def boot_times_path(self) -> str:
        return f"{self.run_dir}/boot-times"

    @property
    def dax_path(self) -> str:
        return f"{self.run_dir}/dax"

    def crun_global_args(self) -> list[str]:
        manager = "disabled" if self.cgroup_mode == "disabled" else "cgroupfs"
        return [self.crun, f"--root={self.crun_root}", f"--cgroup-manager={manager}"]

    def container_cgroup(self, container_id: str) -> str:
        """The cgroup path of a container: ``<parent>/<id>``, or under a systemd slice
        parent (``*.slice``) a ``clearcri-<id>.scope`` as systemd would name it."""
        parent = "" if self.cgroup_parent == "/" else self.cgroup_parent
        if parent.endswith(".slice"):
            return f"{parent}/clearcri-{container_id}.scope"
        return f"{parent}/{container_id}"

    @classmethod
    def from_argv(cls, argv: list[str], environ: dict[str, str] | None = None) -> Settings:
        """Options: --run-dir DIR --cgroup v2|v1|disabled --cgroup-parent PATH --crun PATH
        --busybox PATH --no-poweroff --port-name NAME --port PATH --port-fd N
        --listen PATH --shm-dir DIR --pod-namespaces ipc,net,uts --host-mntns-fd N
        --layer-fs tmpfs|dir --nsexec PATH --unrandomized-helpers. Each has a
        CLEARCRI_AGENT_<NAME> environment twin (e.g. CLEARCRI_AGENT_RUN_DIR)."""
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for key, value in env.items():
            if key.startswith("CLEARCRI_AGENT_"):
                values[key[len("CLEARCRI_AGENT_") :].lower().replace("_", "-")] = value
        flags = {"no-poweroff", "unrandomized-helpers"}
        i = 0
        while i < len(argv):
            arg = argv[i]
            if not arg.startswith("--"):
                raise ValueError(f"unexpected argument {arg!r}")
            name, eq, value = arg[2:].partition("=")
            if name in flags:
                values[name] = "1"
            elif eq:
                values[name] = value
            elif i + 1 < len(argv):
                i += 1
                values[name] = argv[i]
            else:
                raise ValueError(f"option --{name} needs a value")
            i += 1
        known = {
            "run-dir",
            "cgroup",
            "crun",
            "busybox",
            "no-poweroff",
            "port-name",
            "port",
            "port-fd",
            "listen",
            "cgroup-parent",
            "shm-dir",
            "pod-namespaces",
            "host-mntns-fd",
            "layer-fs",
            "nsexec",
            "unrandomized-helpers",
        }
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
        return cls(
            run_dir=values.get("run-dir", "/run/clearcri"),
            cgroup_mode=values.get("cgroup", "v2"),
            crun=values.get("crun", "crun"),
            nsexec=values.get("nsexec"),
            busybox=values.get("busybox", "busybox"),
            power_off=values.get("no-poweroff", "") not in ("1", "true", "yes"),
            port_name=values.get("port-name"),
            port_path=values.get("port"),
            port_fd=int(values["port-fd"]) if "port-fd" in values else None,
            listen_path=values.get("listen"),
            cgroup_parent=values.get("cgroup-parent", "/clearcri"),
            shm_dir=values.get("shm-dir", "/dev/shm"),
            pod_namespaces=tuple(
                k
                for k in values.get("pod-namespaces", ",".join(POD_NAMESPACE_KINDS)).split(",")
                if k
            ),
            host_mntns_fd=int(values["host-mntns-fd"]) if "host-mntns-fd" in values else None,
            layer_fs=values.get("layer-fs", "tmpfs"),
            unrandomized_helpers=values.get("unrandomized-helpers", "") in ("1", "true", "yes"),
        )


def default_nsexec() -> str:
    """Where the guest build puts the exec helper: beside the agent package."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(package), "nsexec")
