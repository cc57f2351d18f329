"""Image files into libvirt volumes and back (reconciler/drivers/volumes.py): on the real
libvirtd (`qemu:///system`, a dir pool in a temp directory) with a real ISO (pycdlib) and
real qcow2 files (qemu-img), and on libvirt's test driver, which cannot stream volumes."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pycdlib
import pytest

from reconciler.drivers.libvirt_hv import LibvirtHypervisor
from reconciler.drivers.volumes import (
    copy_volume,
    delete_volume,
    download_volume,
    upload_volume,
    volume_digest,
)
from state.errors import Invalid, NotFound, Permanent
from state.leases import Fenced
from tests.conftest import TEST_NAMES_PREFIX as PREFIX


def sha1_file(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def make_iso(path: Path, payload: bytes) -> Path:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="NANOVOL")
    iso.add_fp(io.BytesIO(payload), len(payload), "/DATA.BIN;1")
    iso.write(str(path))
    iso.close()
    return path


def make_qcow2(path: Path, raw_bytes: int, virtual: str | None = None) -> Path:
    """A qcow2 holding `raw_bytes` of random data (converted from a raw file)."""
    raw = path.with_suffix(".raw")
    raw.write_bytes(os.urandom(raw_bytes))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)
    raw.unlink()
    if virtual:
        subprocess.run(["qemu-img", "resize", "-q", str(path), virtual], check=True)
    return path


def volumes_of(hv: LibvirtHypervisor, pool: str) -> list[str]:
    def read(conn):
        p = conn.storagePoolLookupByName(pool)
        p.refresh(0)
        return sorted(v.name() for v in p.listAllVolumes())

    return hv.call(f"list volumes of {pool}", read)


@pytest.fixture
def pool(system_hv: LibvirtHypervisor, tmp_path: Path) -> Iterator[str]:
    """A dir pool of our own in a temp directory; volumes and pool removed afterwards."""
    name = f"{PREFIX}-test-volumes-{uuid.uuid4().hex[:8]}"
    system_hv.ensure_dir_pool(name, str(tmp_path / "pool"))
    try:
        yield name
    finally:
        for volume in volumes_of(system_hv, name):
            delete_volume(system_hv, name, volume)
        system_hv.delete_pool(name)


# -- the real libvirtd ------------------------------------------------------------------------


@pytest.mark.integration
def test_iso_round_trip(system_hv, pool, tmp_path):
    iso = make_iso(tmp_path / "media.iso", os.urandom(3 << 20))
    size, digest = upload_volume(system_hv, pool, f"{PREFIX}-image-m1-1.iso", str(iso), fmt="raw")
    assert (size, digest) == (iso.stat().st_size, sha1_file(iso))
    assert volume_digest(system_hv, pool, f"{PREFIX}-image-m1-1.iso") == (size, digest)
    back = tmp_path / "back" / "media.iso"
    back.parent.mkdir()
    assert download_volume(system_hv, pool, f"{PREFIX}-image-m1-1.iso", str(back)) == (size, digest)
    assert back.read_bytes() == iso.read_bytes()
    assert [p.name for p in back.parent.iterdir()] == ["media.iso"]  # no temp file left


@pytest.mark.integration
def test_qcow2_round_trip_keeps_the_virtual_size_and_no_stale_tail(system_hv, pool,
                                                                    tmp_path):
    big = make_qcow2(tmp_path / "big.qcow2", 6 << 20, virtual="10G")
    small = make_qcow2(tmp_path / "small.qcow2", 64 << 10)
    name = f"{PREFIX}-image-d1-1.qcow2"
    assert upload_volume(system_hv, pool, name, str(big), fmt="qcow2")[1] == sha1_file(big)

    def info(conn):
        vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
        return vol.info(), vol.XMLDesc(0)

    (_, capacity, _), xml = system_hv.call("read volume", info)
    assert capacity == 10 << 30 and "<format type='qcow2'/>" in xml
    # the same name again with a smaller file: replaced, nothing of the bigger one remains
    size, digest = upload_volume(system_hv, pool, name, str(small), fmt="qcow2")
    assert (size, digest) == (small.stat().st_size, sha1_file(small)) and size < big.stat().st_size
    back = tmp_path / "back.qcow2"
    assert download_volume(system_hv, pool, name, str(back)) == (size, digest)
    check = subprocess.run(["qemu-img", "check", str(back)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # a URI works as well as a hypervisor
    assert volume_digest("qemu:///system", pool, name) == (size, digest)


@pytest.mark.integration
def test_wrong_format_and_bad_targets_are_refused(system_hv, pool, tmp_path):
    iso = make_iso(tmp_path / "m.iso", b"not a disk")
    with pytest.raises(Permanent, match="not qcow2"):
        upload_volume(system_hv, pool, f"{PREFIX}-image-x-1.qcow2", str(iso), fmt="qcow2")
    assert volumes_of(system_hv, pool) == []  # the refused volume is gone
    with pytest.raises(NotFound):
        upload_volume(system_hv, f"{PREFIX}-no-such-pool", f"{PREFIX}-v", str(iso), fmt="raw")
    with pytest.raises(Invalid, match="'someone-elses.iso' is not ours"):
        upload_volume(system_hv, pool, "someone-elses.iso", str(iso), fmt="raw")
    with pytest.raises(NotFound):
        volume_digest(system_hv, pool, f"{PREFIX}-missing")
    with pytest.raises(NotFound):
        download_volume(system_hv, pool, f"{PREFIX}-missing", str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


@pytest.mark.integration
def test_a_stream_stops_at_the_block_its_progress_refuses(system_hv, pool, tmp_path):
    """Long work among replicas: once the lease is lost, `report` raises Fenced at the next
    block (reconciler/longwork.py); the stream is aborted and nothing half-made is left."""
    disk = make_qcow2(tmp_path / "disk.qcow2", 8 << 20)
    name = f"{PREFIX}-image-d2-1.qcow2"
    seen: list[int] = []

    def lost_after_one_block(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) > 1:
            raise Fenced("lease cell:c1 (token 1) is no longer this replica's")

    with pytest.raises(Fenced):
        upload_volume(system_hv, pool, name, str(disk), fmt="qcow2",
                      progress=lost_after_one_block)
    assert len(seen) == 2 and seen[-1] < disk.stat().st_size
    assert volumes_of(system_hv, pool) == []  # the half-sent volume is removed

    upload_volume(system_hv, pool, name, str(disk), fmt="qcow2")
    seen.clear()
    back = tmp_path / "back" / "disk.qcow2"
    back.parent.mkdir()
    with pytest.raises(Fenced):
        download_volume(system_hv, pool, name, str(back), progress=lost_after_one_block,
                        expected=disk.stat().st_size)
    assert len(seen) == 2 and seen[-1] < disk.stat().st_size
    assert list(back.parent.iterdir()) == []  # no file, no temp file

    # a copy between cells (two pools here): the refusal is what the caller gets, not the
    # other end's "the copy failed" (a Permanent, which would fail a migration for good)
    other = f"{PREFIX}-test-volumes-{uuid.uuid4().hex[:8]}"
    system_hv.ensure_dir_pool(other, str(tmp_path / "other"))
    try:
        seen.clear()
        with pytest.raises(Fenced):
            copy_volume(system_hv, pool, system_hv, other, name,
                        progress=lost_after_one_block)
        assert volumes_of(system_hv, other) == [] and volumes_of(system_hv, pool) == [name]
    finally:
        for volume in volumes_of(system_hv, other):
            delete_volume(system_hv, other, volume)
        system_hv.delete_pool(other)


# -- libvirt's test driver ------------------------------------------------------------------------


@pytest.fixture
def test_hv() -> Iterator[LibvirtHypervisor]:
    hv = LibvirtHypervisor("test:///default")
    try:
        yield hv
    finally:
        hv.close()


def test_test_driver_cannot_stream_volumes_and_leaves_nothing(test_hv, tmp_path):
    iso = make_iso(tmp_path / "m.iso", b"x")
    name = f"{PREFIX}-image-{uuid.uuid4().hex[:8]}.iso"
    with pytest.raises(Permanent, match="cannot stream volumes"):
        upload_volume(test_hv, "default-pool", name, str(iso), fmt="raw")
    assert name not in volumes_of(test_hv, "default-pool")
    with pytest.raises(NotFound):
        upload_volume(test_hv, "no-such-pool", name, str(iso), fmt="raw")


def test_test_driver_refuses_downloads_at_once_and_leaves_no_file(test_hv, tmp_path):
    """The other half of a round trip: libvirt's test driver (9.0 here) implements neither
    virStorageVolUpload nor virStorageVolDownload, so a round trip cannot run on it (it runs
    on qemu:///system above). What a test-driver cell must do instead is refuse at once,
    Permanent and naming why, not retry: asserted for reading a volume that exists."""
    name = f"{PREFIX}-image-{uuid.uuid4().hex[:8]}.iso"

    def create(conn):
        conn.storagePoolLookupByName("default-pool").createXML(
            f"<volume><name>{name}</name><capacity unit='bytes'>4096</capacity>"
            "<target><format type='raw'/></target></volume>", 0)

    test_hv.call("create a volume", create)
    try:
        back = tmp_path / "back" / "m.iso"
        back.parent.mkdir()
        with pytest.raises(Permanent, match="cannot stream volumes.*virStorageVolDownload"):
            download_volume(test_hv, "default-pool", name, str(back))
        assert list(back.parent.iterdir()) == []  # neither the file nor its temp file
        with pytest.raises(Permanent, match="cannot stream volumes"):
            volume_digest(test_hv, "default-pool", name)
    finally:
        delete_volume(test_hv, "default-pool", name)
    assert name not in volumes_of(test_hv, "default-pool")
