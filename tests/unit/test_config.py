"""Daemon config loading: types, unknown keys, derived defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from cri.config import ConfigError, load_config


def test_defaults_derive_vm_dirs_from_daemon_dirs(tmp_path: Path) -> None:
    config = load_config(None)
    assert config.vm.run_root == Path("/run/clearcri/sandboxes")
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\nrun_dir = "/tmp/x"\nstate_dir = "/tmp/y"\n')
    config = load_config(path)
    assert config.vm.run_root == Path("/tmp/x/sandboxes")
    assert config.vm.guest_dir == Path("/tmp/y/guest")


def test_explicit_vm_dirs_win_even_when_equal_to_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[daemon]\nstate_dir = "/tmp/y"\n[vm]\nguest_dir = "/var/lib/clearcri/guest"\n'
        'template_dir = "/dev/shm/t"\n'
    )
    config = load_config(path)
    assert config.vm.guest_dir == Path("/var/lib/clearcri/guest")
    assert config.vm.template_dir == Path("/dev/shm/t")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[vm]\nvcpus = 2\n", "unknown key vm.vcpus"),
        ("[nope]\n", "unknown table"),
        ('[vm]\ndefault_vcpus = "two"\n', "must be a number"),
        ("[vm]\ntemplates = 1\n", "true or false"),
        ("[daemon]\nsocket = 3\n", "path string"),
        ('[daemon]\ncgroup_driver = "x"\n', "cgroup_driver"),
        ("[vm\n", "cannot read config"),
        ("[vm]\njail_first_id = 0\n", "jail_first_id"),
        ("[vm]\njail_first_id = 4294967000\njail_ids = 65536\n", "below 2"),
        ("[vm]\nimage_slots = 184\n", r"image_slots must be 0 to 183"),
        ("[vm]\nimage_slots = -1\n", r"image_slots must be 0 to 183"),
        ("[vm]\nstandby_burst = -1\n", r"standby_burst must be 0 or more"),
        ("[vm]\nmax_clone_memory_mib = -1\n", r"max_clone_memory_mib must be 0"),
        ("[vm]\ntcg_tb_size_mib = 0\n", r"tcg_tb_size_mib must be 1 to 2048"),
        ("[vm]\ntcg_tb_size_mib = 4096\n", r"tcg_tb_size_mib must be 1 to 2048"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_nested_network_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[vm.network]\nenabled = false\nconf_dirs = ["/tmp/cni"]\nnetns_dir = "/run/x"\n'
    )
    config = load_config(path)
    assert config.vm.network.enabled is False
    assert config.vm.network.conf_dirs == [Path("/tmp/cni")]
    assert config.vm.network.netns_dir == Path("/run/x")
    path.write_text("[vm.network]\nbogus = 1\n")
    with pytest.raises(ConfigError, match=r"vm\.network\.bogus"):
        load_config(path)
