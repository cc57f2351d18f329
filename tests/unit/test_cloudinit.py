"""Tests of reconciler/cloudinit.py: seed ISOs are read back with pycdlib and their YAML
loaded, so they check what a guest's cloud-init would see, not how we wrote it."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml

from reconciler.cloudinit import (
    build_seed_files,
    build_seed_iso,
    data_mount_path,
    local_hostname,
    pack_seed_iso,
    read_seed_iso,
    sha512_crypt,
)

PASSWORD = "S3cr3t: 'pa\"ss #word"  # YAML-hostile on purpose


def seed(**overrides: Any) -> dict[str, str]:
    values: dict[str, Any] = dict(
        instance_id="guest-1", hostname="web-1", admin_name="nano", admin_password=PASSWORD
    )
    values.update(overrides)
    return read_seed_iso(build_seed_iso(**values))


def hashes(password: str, hashed: str) -> bool:
    """`hashed` is the SHA-512 crypt hash of `password` (recomputed with its own salt;
    tests/unit/test_seed_password.py checks the hash function against OpenSSL)."""
    assert hashed.startswith("$6$")
    return sha512_crypt(password, hashed.split("$")[2]) == hashed


def user_data(files: dict[str, str]) -> dict[str, Any]:
    text = files["user-data"]
    assert text.startswith("#cloud-config\n")
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def test_iso_carries_exactly_the_nocloud_files() -> None:
    files = seed()
    assert sorted(files) == ["meta-data", "user-data"]
    with_network = seed(network_config={"version": 2, "ethernets": {"eth0": {"dhcp4": True}}})
    assert sorted(with_network) == ["meta-data", "network-config", "user-data"]


def test_read_back_equals_what_was_built() -> None:
    kwargs: dict[str, Any] = dict(
        instance_id="guest-1",
        hostname="web-1",
        admin_name="nano",
        admin_password=PASSWORD,
        data_disks=["sdb"],
        network_config={"version": 1, "config": []},
        password_salt="fixedSalt",  # random otherwise: two builds differ in the hash
    )
    assert read_seed_iso(build_seed_iso(**kwargs)) == build_seed_files(**kwargs)


def test_volume_label_and_names_for_every_reader() -> None:
    data = build_seed_iso(instance_id="g", hostname="h", admin_name=None, admin_password="p")
    pvd = data[16 * 2048 : 17 * 2048]  # the primary volume descriptor
    assert pvd[1:6] == b"CD001" and pvd[40:72].rstrip() == b"cidata"
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        assert iso.has_joliet() and iso.has_rock_ridge()
        for kind, name in (
            ("joliet_path", "/user-data"),
            ("rr_path", "/user-data"),
            ("iso_path", "/USER_DATA.;1"),
        ):
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, **{kind: name})
            assert out.getvalue().startswith(b"#cloud-config")
    finally:
        iso.close()


@pytest.mark.skipif(shutil.which("blkid") is None, reason="blkid not installed")
def test_blkid_sees_the_cidata_label(tmp_path: Path) -> None:
    # cloud-init finds its NoCloud seed by this label
    path = tmp_path / "seed.iso"
    path.write_bytes(
        build_seed_iso(instance_id="g", hostname="h", admin_name=None, admin_password="p")
    )
    found = subprocess.run(
        ["blkid", "-o", "export", str(path)], capture_output=True, text=True, check=False
    ).stdout
    assert "LABEL=cidata" in found.splitlines() and "TYPE=iso9660" in found.splitlines()


def test_admin_user_with_sudo_and_password() -> None:
    config = user_data(seed(root_enabled=False))
    assert config["users"] == [
        {
            "name": "nano",
            "lock_passwd": False,
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "shell": "/bin/bash",
        }
    ]
    assert config["chpasswd"]["expire"] is False
    (entry,) = config["chpasswd"]["users"]
    assert (entry["name"], entry["type"]) == ("nano", "hash")
    assert hashes(PASSWORD, entry["password"])
    assert config["chpasswd"]["list"] == [f"nano:{entry['password']}"]  # cloud-init < 22.2
    assert config["ssh_pwauth"] is True
    assert config["disable_root"] is True
    assert "runcmd" not in config


def test_modern_password_form_only() -> None:
    config = user_data(seed(legacy_password_list=False))
    assert "list" not in config["chpasswd"]
    assert hashes(PASSWORD, config["chpasswd"]["users"][0]["password"])


@pytest.mark.parametrize("admin", [None, "root"])
def test_root_as_admin(admin: str | None) -> None:
    config = user_data(seed(admin_name=admin, root_enabled=True))
    assert "users" not in config  # root exists: only its password changes
    (entry,) = config["chpasswd"]["users"]
    assert (entry["name"], entry["type"]) == ("root", "hash")
    assert hashes(PASSWORD, entry["password"])
    assert config["disable_root"] is False
    # sshd must allow root's password where the image says prohibit-password
    (command,) = config["runcmd"]
    assert command[:2] == ["sh", "-c"] and "PermitRootLogin yes" in command[2]
    assert PASSWORD not in command[2]
    locked = user_data(seed(admin_name=admin, root_enabled=False))
    assert locked["disable_root"] is True and "runcmd" not in locked


def test_data_disks_get_a_filesystem_each_and_mount_points() -> None:
    config = user_data(seed(data_disks=["sdb", "/dev/sdc"]))
    assert config["disk_setup"] == {
        "/dev/sdb": {"table_type": "mbr", "layout": [100], "overwrite": False},
        "/dev/sdc": {"table_type": "mbr", "layout": [100], "overwrite": False},
    }
    assert config["fs_setup"] == [
        {"label": "data", "filesystem": "ext4", "device": "/dev/sdb", "partition": "auto"},
        {"label": "data2", "filesystem": "ext4", "device": "/dev/sdc", "partition": "auto"},
    ]
    assert config["mounts"] == [
        ["/dev/sdb", "/opt/data", "ext4", "defaults,nofail", "0", "2"],
        ["/dev/sdc", "/opt/data2", "ext4", "defaults,nofail", "0", "2"],
    ]
    custom = user_data(seed(data_disks=["sdb"], data_path="/srv/data/"))
    assert custom["mounts"][0][1] == "/srv/data"
    assert not {"disk_setup", "fs_setup", "mounts"} & set(user_data(seed()))
    assert [data_mount_path("/d", n) for n in (1, 2, 3)] == ["/d", "/d2", "/d3"]


# What cloud-init's cc_disk_setup (22.4, Debian 12) gives sfdisk for an MBR `layout`:
# `true` -> "0,", a list [100] -> ",,83" (get_partition_mbr_layout).
CLOUD_INIT_SFDISK_INPUT = {True: "0,", (100,): ",,83"}


@pytest.mark.parametrize(("layout", "accepted"), [(True, False), ((100,), True)])
def test_sfdisk_takes_the_data_disk_layout_nano_asks_for(tmp_path: Path, layout: Any,
                                                         accepted: bool) -> None:
    """The layout in nano's seed must survive the guest's sfdisk: run the input that
    cloud-init 22.4 makes from it through this host's sfdisk (util-linux 2.38, as in
    Debian 12) the way cloud-init does (`--Linux --unit=S --force`), on a blank file."""
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk (util-linux/fdisk) is not installed here")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    with open(disk, "r+b") as fh:
        fh.truncate(64 << 20)
    done = subprocess.run(["sfdisk", "--Linux", "--unit=S", "--force", str(disk)],
                          input=CLOUD_INIT_SFDISK_INPUT[layout] + "\n", text=True,
                          capture_output=True)
    assert (done.returncode == 0) is accepted, done.stderr
    ours = user_data(seed(data_disks=["sdb"]))["disk_setup"]["/dev/sdb"]["layout"]
    assert tuple(ours) == (100,)


def test_data_disks_by_stable_path() -> None:
    """The reconciler names data disks by their /dev/disk/by-id path (the serial nano
    gives them), not by sdX: the guest's kernel may find them in another order."""
    from reconciler.guest_xml import guest_disk_path

    scsi, ide = guest_disk_path("scsi", 1), guest_disk_path("ide", 2)
    assert scsi == "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_nano-disk1"
    assert ide == "/dev/disk/by-id/ata-QEMU_HARDDISK_nano-disk2"
    assert guest_disk_path("sata", 1) == "/dev/disk/by-id/ata-QEMU_HARDDISK_nano-disk1"
    config = user_data(seed(data_disks=[scsi]))
    assert list(config["disk_setup"]) == [scsi]
    assert config["fs_setup"][0]["device"] == scsi and config["mounts"][0][0] == scsi
    with pytest.raises(ValueError):
        seed(data_disks=["/dev/disk/by-id/x y"])


def test_meta_data() -> None:
    meta = yaml.safe_load(seed(instance_id="6f1c-guest", hostname="Web_01.")["meta-data"])
    assert meta == {"instance-id": "6f1c-guest", "local-hostname": "web-01"}


@pytest.mark.parametrize(
    ("name", "host"),
    [("web-1", "web-1"), ("DB_Primary", "db-primary"), ("__", "guest"), ("a" * 80, "a" * 63)],
)
def test_local_hostname(name: str, host: str) -> None:
    assert local_hostname(name) == host


def test_network_config_round_trips() -> None:
    network = {
        "version": 1,
        "config": [
            {
                "type": "physical",
                "name": "eth0",
                "mac_address": "00:16:3e:12:34:56",
                "subnets": [
                    {"type": "static", "address": "172.16.0.10/24", "gateway": "172.16.0.1"}
                ],
            },
            {"type": "nameserver", "address": ["172.16.0.1"]},
        ],
    }
    assert yaml.safe_load(seed(network_config=network)["network-config"]) == network


def test_only_the_password_hash_appears_and_in_user_data_only() -> None:
    network = {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}
    kwargs: dict[str, Any] = dict(
        instance_id="guest-1",
        hostname="web-1",
        admin_name="nano",
        admin_password="Unique-Pw-4711",
        network_config=network,
        data_disks=["sdb"],
    )
    data = build_seed_iso(**kwargs)
    assert b"Unique-Pw-4711" not in data
    files = read_seed_iso(data)
    hashed = user_data(files)["chpasswd"]["users"][0]["password"]
    assert hashes("Unique-Pw-4711", hashed)
    assert all(hashed not in text for name, text in files.items() if name != "user-data")
    # the image holds the file's data once (Joliet and Rock Ridge share it): no stray copy
    assert data.count(hashed.encode()) == files["user-data"].count(hashed)


def test_yaml_comes_from_data_not_text() -> None:
    hostile = "x\n#cloud-config"
    with pytest.raises(ValueError):
        seed(admin_password=hostile)  # a line break would add a chpasswd line
    config = user_data(seed(admin_password="a: b - c"))
    assert hashes("a: b - c", config["chpasswd"]["users"][0]["password"])


@pytest.mark.parametrize(
    "overrides",
    [
        dict(instance_id=""),
        dict(instance_id="a b"),
        dict(admin_name="Root Admin"),
        dict(admin_name="x;rm"),
        dict(admin_password=""),
        dict(data_disks=["sdb; reboot"]),
        dict(data_disks=["sdb"], data_path="opt/data"),
        dict(data_disks=["sdb"], data_path="/opt/my data"),
        dict(data_path="/"),
    ],
)
def test_unusable_input_is_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        seed(**overrides)


def test_pack_and_read_errors() -> None:
    with pytest.raises(ValueError):
        pack_seed_iso({"vendor-data": "x"})
    with pytest.raises(ValueError):
        read_seed_iso(b"\0" * 65536)
