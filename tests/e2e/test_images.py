"""MediaImage and DiskImage manifests on a real nanod: metadata created, the local file
uploaded, re-apply ok, a changed file uploaded again (SHA-1 compared with the server's
checksum), delete."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Nanod, lines


def write_image(kind: str, path: Path, version: int) -> None:
    """A real ISO 9660 file (media) or qcow2 file (disk) whose bytes depend on `version`."""
    if kind == "DiskImage":
        if shutil.which("qemu-img") is None:
            pytest.skip("needs qemu-img to make a qcow2 file")
        path.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path),
                        f"{version}M"], check=True)
        return
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=f"TEST{version}")
    data = f"version {version}\n".encode()
    iso.add_fp(io.BytesIO(data), len(data), "/README.;1")
    iso.write(str(path))
    iso.close()


@pytest.mark.parametrize("kind,route", [("MediaImage", "/media_images/"),
                                        ("DiskImage", "/disk_images/")])
def test_image_manifest_uploads_when_checksum_differs(nanod: Nanod, tmp_path: Path, kind,
                                                      route):
    (tmp_path / "files").mkdir()
    image = tmp_path / "files" / "boot.img"
    write_image(kind, image, 1)
    manifest = tmp_path / "image.yaml"
    manifest.write_text(f"kind: {kind}\nname: boot\nspec:\n  description: a test image\n"
                        f"  tags: [test]\n  file: files/boot.img\n")
    first = nanod.run("apply", "-f", str(manifest))
    assert first.returncode == 0, first.stdout + first.stderr
    assert lines(first.stdout) == [f"changed {kind}/boot created", "ok=0 changed=1 failed=0"]
    rows = [r for r in nanod.data_of(route) if r["name"] == "boot"]
    assert len(rows) == 1 and rows[0]["description"] == "a test image"
    assert rows[0]["checksum"] == hashlib.sha1(image.read_bytes()).hexdigest()
    assert lines(nanod.run("apply", "-f", str(manifest)).stdout)[-1] == "ok=1 changed=0 failed=0"

    write_image(kind, image, 2)
    check = nanod.run("apply", "-f", str(manifest), "--check", "--diff")
    assert f"changed {kind}/boot would update file" in lines(check.stdout)
    applied = nanod.run("apply", "-f", str(manifest))
    assert lines(applied.stdout)[0] == f"changed {kind}/boot updated file", applied.stdout
    row = [r for r in nanod.data_of(route) if r["name"] == "boot"][0]
    assert row["checksum"] == hashlib.sha1(image.read_bytes()).hexdigest()

    deleted = nanod.run("delete", "-f", str(manifest))
    assert lines(deleted.stdout) == [f"changed {kind}/boot deleted", "ok=0 changed=1 failed=0"]
    assert not [r for r in nanod.data_of(route) if r["name"] == "boot"]
