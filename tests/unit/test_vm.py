"""The qemu-lite command line, VM sizing and accelerator checks, without booting."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sandbox.accel import _kvm_static_verdict, choose_accel
from sandbox.api import SandboxError, SandboxSpec, align_up
from sandbox.node import SandboxConfig, memory_floor_bytes, qemu_memory_mib, size_vm
from sandbox.vm import (
    MAX_IMAGE_SLOTS,
    MachineSpec,
    build_command,
    slot_root_port,
    warm_up_root_port,
)
from tests.unit.fake_guest import fake_assets


def _spec(tmp_path: Path, **kw: object) -> MachineSpec:
    image = tmp_path / "os.img"
    image.write_bytes(b"\0" * 3_000_000)
    fields: dict[str, object] = {
        "name": "pod1",
        "kernel": tmp_path / "vmlinux",
        "initrd": tmp_path / "initrd.img",
        "os_image": image,
        "run_dir": tmp_path / "run",
    }
    fields.update(kw)
    return MachineSpec(**fields)  # type: ignore[arg-type]


def _opts(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, part in enumerate(cmd) if part == flag]


def test_command_is_stripped_q35_with_dax_os_image(tmp_path: Path) -> None:
    cmd = build_command(_spec(tmp_path))
    assert "-nodefaults" in cmd and "-no-user-config" in cmd and "-no-reboot" in cmd
    machine = _opts(cmd, "-M")[0]
    for part in ("q35", "sata=off", "smbus=off", "usb=off", "vmport=off", "graphics=off"):
        assert part in machine
    assert _opts(cmd, "-bios") == ["/usr/share/qemu/qboot.rom"]
    assert _opts(cmd, "-accel") == ["tcg,tb-size=48"]
    backend = next(o for o in _opts(cmd, "-object") if o.startswith("memory-backend-file"))
    assert "share=on" in backend and "readonly=on" in backend
    # the backing size is rounded up to the 2 MiB persistent-memory alignment
    assert f"size={4 * 2**20}" in backend
    devices = _opts(cmd, "-device")
    assert any(d.startswith("virtio-pmem-pci,memdev=osimg") for d in devices)
    assert any("name=org.clearcri.agent" in d for d in devices)
    # the four image slots, and the port a standby's warm-up plugs its image into
    ports = [d for d in devices if d.startswith("pcie-root-port")]
    assert len(ports) == 5
    assert warm_up_root_port(_spec(tmp_path)) == ("slot4", "0000:00:08.4")
    assert ports[-1].startswith("pcie-root-port,id=slot4,") and "addr=0x08.4" in ports[-1]
    assert _opts(cmd, "-sandbox")[0].startswith("on,")
    assert "swiotlb=noforce" in _opts(cmd, "-append")[0]


def test_blk_mode_replaces_pmem_with_virtio_blk(tmp_path: Path) -> None:
    cmd = build_command(_spec(tmp_path, os_image_mode="blk"))
    devices = _opts(cmd, "-device")
    assert not any(d.startswith("virtio-pmem-pci") for d in devices)
    assert any(d.startswith("virtio-blk-pci") for d in devices)
    assert "clearcri.root=/dev/vda" in _opts(cmd, "-append")[0]


def test_kvm_uses_host_cpu(tmp_path: Path) -> None:
    cmd = build_command(_spec(tmp_path, accel="kvm"))
    assert _opts(cmd, "-accel") == ["kvm"]
    assert _opts(cmd, "-cpu") == ["host"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vcpus", 0, "vCPU"),
        ("memory_mib", 16, "64 MiB"),
        ("accel", "hvf", "accel"),
        ("os_image_mode", "nfs", "os_image_mode"),
    ],
)
def test_bad_machine_specs_are_refused(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_command(_spec(tmp_path, **{field: value}))


def test_slots_pack_eight_functions_per_device() -> None:
    assert slot_root_port(0) == ("slot0", "0000:00:08.0")
    assert slot_root_port(7) == ("slot7", "0000:00:08.7")
    assert slot_root_port(8) == ("slot8", "0000:00:09.0")


def test_multifunction_set_on_function_zero_only(tmp_path: Path) -> None:
    cmd = build_command(_spec(tmp_path, image_slots=9))
    ports = [d for d in _opts(cmd, "-device") if d.startswith("pcie-root-port")]
    assert len(ports) == 10  # the nine slots and the warm-up port
    assert "multifunction=on" in ports[0] and "addr=0x08.0" in ports[0]
    assert "multifunction=on" not in ports[1]
    assert "multifunction=on" in ports[8] and "addr=0x09.0" in ports[8]


def test_align_up() -> None:
    assert align_up(1) == 2 * 2**20
    assert align_up(2 * 2**20) == 2 * 2**20


def test_vm_size_follows_pod_limits() -> None:
    config = SandboxConfig(default_vcpus=1, default_memory_mib=256, max_vcpus=4)
    assert size_vm(SandboxSpec("a"), config, 64) == (1, 256)
    spec = SandboxSpec("a", cpu_quota_us=250_000, cpu_period_us=100_000, memory_limit_bytes=2**30)
    assert size_vm(spec, config, 64) == (3, 1024 + config.guest_overhead_mib)
    huge = SandboxSpec("a", cpu_quota_us=10**9, cpu_period_us=100_000)
    assert size_vm(huge, config, 64)[0] == 4


def test_vm_and_qemu_fit_the_pod_memory_budget() -> None:
    config = SandboxConfig(guest_overhead_mib=128, qemu_overhead_mib=64, min_memory_mib=128)
    mib = 2**20
    # 256Mi limit, no RuntimeClass overhead: kubelet's pod cgroup is 256 MiB, so the VM
    # gets 256 - 64, not 256 + 128 (which the host OOM-killed as a whole)
    tight = SandboxSpec("a", memory_limit_bytes=256 * mib, memory_budget_bytes=256 * mib)
    assert size_vm(tight, config, 64)[1] == 192
    # an overhead that covers the guest and QEMU: the guest gets the limit + its overhead
    roomy = SandboxSpec("a", memory_limit_bytes=256 * mib, memory_budget_bytes=448 * mib)
    assert size_vm(roomy, config, 64)[1] == 256 + 128
    # a partial overhead: as much as fits
    partial = SandboxSpec("a", memory_limit_bytes=256 * mib, memory_budget_bytes=320 * mib)
    assert size_vm(partial, config, 64)[1] == 320 - 64


def test_a_budget_too_small_for_any_vm_gets_the_smallest_vm_and_room_for_it() -> None:
    config = SandboxConfig(qemu_overhead_mib=64, min_memory_mib=128)
    spec = SandboxSpec("a", memory_limit_bytes=64 * 2**20, memory_budget_bytes=64 * 2**20)
    # the VM an overhead would have paid for: the limit and the guest's own needs
    assert size_vm(spec, config, 64)[1] == 64 + config.guest_overhead_mib
    assert memory_floor_bytes(spec, 192, 64) == (192 + 64) * 2**20
    roomy = SandboxSpec("a", memory_limit_bytes=512 * 2**20, memory_budget_bytes=512 * 2**20)
    assert memory_floor_bytes(roomy, size_vm(roomy, config, 64)[1], 64) == 0


def test_qemu_pays_for_its_translation_cache_only_without_kvm() -> None:
    config = SandboxConfig(qemu_overhead_mib=32, tcg_tb_size_mib=32)
    assert qemu_memory_mib(config, "tcg") == 64
    assert qemu_memory_mib(config, "kvm") == 32
    # a 256Mi limit plus the chart's overhead (128 for the guest, 64 for QEMU under TCG)
    spec = SandboxSpec("a", memory_limit_bytes=256 * 2**20, memory_budget_bytes=448 * 2**20)
    assert size_vm(spec, config, qemu_memory_mib(config, "tcg"))[1] == 256 + 128


def test_a_budget_too_small_for_any_vm_is_refused_when_configured_so() -> None:
    config = SandboxConfig(qemu_overhead_mib=64, min_memory_mib=128, small_pods="refuse")
    spec = SandboxSpec("a", memory_limit_bytes=64 * 2**20, memory_budget_bytes=64 * 2**20)
    with pytest.raises(SandboxError, match="RuntimeClass with an overhead"):
        size_vm(spec, config, 64)


def test_kvm_static_verdict(tmp_path: Path) -> None:
    assert "does not exist" in _kvm_static_verdict(tmp_path / "kvm", tmp_path)
    dev = tmp_path / "kvm"
    dev.write_text("")
    mods = tmp_path / "module"
    (mods / "kvm_pvm").mkdir(parents=True)
    assert "kvm_pvm" in _kvm_static_verdict(dev, mods)
    (mods / "kvm_pvm").rmdir()
    assert _kvm_static_verdict(dev, mods) == ""


def test_choose_accel_honours_tcg_and_rejects_unknown(tmp_path: Path) -> None:
    assets = fake_assets(tmp_path / "guest")
    assert choose_accel("tcg", qemu="qemu", assets=assets).accel == "tcg"
    with pytest.raises(ValueError, match="auto, kvm or tcg"):
        choose_accel("fast", qemu="qemu", assets=assets)


def test_loop_shutdown_with_a_running_vm_reports_no_error(tmp_path: Path) -> None:
    """The daemon stopping leaves its VMs running (a new daemon adopts them): the
    cancelled exit watch must not surface as an error per VM."""
    import asyncio
    import os
    import signal

    from sandbox.vm import VmProcess

    errors: list[dict[str, object]] = []
    pids: list[int] = []
    exited: list[int | None] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        proc = await VmProcess.spawn(["sleep", "30"], stderr_log=tmp_path / "err", cwd=tmp_path)
        proc.on_exit(lambda p: exited.append(p.returncode))
        pids.append(proc.pid)

    try:
        asyncio.run(main())
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    assert errors == []
    assert exited == []  # nothing exited: the process outlived the loop


def test_a_vm_process_is_watched_without_a_thread_and_reaped_with_its_status(
    tmp_path: Path,
) -> None:
    """A node's VMs cost the daemon no thread each; an exit is noticed, the process
    reaped and its status kept (negative: the signal)."""
    import asyncio
    import os
    import signal
    import threading

    from sandbox.vm import VmProcess

    async def main() -> tuple[int, list[int | None], int | None, int | None]:
        before = threading.active_count()
        procs = [
            await VmProcess.spawn(["sleep", "30"], stderr_log=tmp_path / "err", cwd=tmp_path)
            for _ in range(5)
        ]
        threads = threading.active_count() - before
        for proc in procs:
            proc.kill(signal.SIGKILL)
        codes = [await proc.wait(10) for proc in procs]
        done = await VmProcess.spawn(
            ["sh", "-c", "exit 3"], stderr_log=tmp_path / "err", cwd=tmp_path
        )
        code = await done.wait(10)
        reaped = None
        try:
            os.waitpid(done.pid, os.WNOHANG)
        except ChildProcessError:
            reaped = done.pid
        return threads, codes, code, reaped

    threads, codes, code, reaped = asyncio.run(main())
    assert threads == 0
    assert codes == [-signal.SIGKILL] * 5
    assert code == 3
    assert reaped is not None  # no zombie left


@pytest.mark.parametrize(("slots", "fits"), [(MAX_IMAGE_SLOTS, True), (MAX_IMAGE_SLOTS + 1, False)])
def test_the_most_image_slots_fit_on_the_root_bus(tmp_path: Path, slots: int, fits: bool) -> None:
    """QEMU itself takes the root ports of the most image slots the config allows (and
    the warm-up's), and refuses one more: q35's LPC bridge holds the next address."""
    vm = build_command(_spec(tmp_path, image_slots=slots))
    ports = [d for d in _opts(vm, "-device") if d.startswith("pcie-root-port")]
    cmd = ["qemu-system-x86_64", "-M", _opts(vm, "-M")[0], "-nodefaults", "-display", "none"]
    cmd += ["-S"]
    cmd += ["-accel", "tcg", "-monitor", "stdio"]
    for port in ports:
        cmd += ["-device", port]
    done = subprocess.run(cmd, input="quit\n", capture_output=True, text=True, timeout=60)
    assert (done.returncode == 0) is fits, done.stderr
