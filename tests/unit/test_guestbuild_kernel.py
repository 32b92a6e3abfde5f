"""The guest kernel's configuration checks (guestbuild/kernel.py)."""

from __future__ import annotations

from pathlib import Path

from guestbuild import kernel


def test_release_from_source_version() -> None:
    assert kernel.kernel_release("6.1.192-3") == "6.1.192-clearcri"
    assert kernel.kernel_release("6.1.76+deb12u1") == "6.1.76-clearcri"


def test_config_problems_name_dropped_options() -> None:
    fragment = "CONFIG_NET_9P=y\nCONFIG_MODULES=n\nCONFIG_HZ_100=y\nCONFIG_NR_CPUS=64\n"
    final = "CONFIG_NET_9P=y\n# CONFIG_MODULES is not set\nCONFIG_NR_CPUS=8\n"
    assert kernel.config_problems(fragment, final) == [
        "CONFIG_HZ_100=y (Kconfig gave n)",
        "CONFIG_NR_CPUS=64 (Kconfig gave 8)",
    ]
    assert kernel.config_problems(fragment, final + "CONFIG_HZ_100=y\nCONFIG_NR_CPUS=64\n") == []


def test_fragment_keeps_what_the_pod_vm_needs() -> None:
    values = kernel.parse_config(kernel.config_fragment().decode())
    for option in (
        "CONFIG_PVH",  # qemu starts the vmlinux through its PVH note
        "CONFIG_VIRTIO_PMEM",
        "CONFIG_FS_DAX",
        "CONFIG_EROFS_FS",
        "CONFIG_OVERLAY_FS",
        "CONFIG_NET_9P_VIRTIO",
        "CONFIG_9P_FS",
        "CONFIG_CGROUP_BPF",
        "CONFIG_SECCOMP_FILTER",
        "CONFIG_USER_NS",
        "CONFIG_NO_HZ_IDLE",
        "CONFIG_HZ_100",
    ):
        assert values.get(option) == "y", option
    assert values["CONFIG_MODULES"] == "n"


def test_cached_build_is_used_without_tools(tmp_path: Path) -> None:
    def no_source() -> Path:
        raise AssertionError("a cached kernel needs no source")

    builder = kernel.KernelBuilder(no_source, "6.1.192-3", cache_dir=tmp_path, fragment=b"X\n")
    builder.cached.write_bytes(b"\x7fELF")
    assert builder.build() == builder.cached
    other = kernel.KernelBuilder(no_source, "6.1.192-3", cache_dir=tmp_path, fragment=b"Y\n")
    assert other.cached != builder.cached
