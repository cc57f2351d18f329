"""An upload that fills the disk: the image store is a small tmpfs of its own (mounted by
the test; skipped where mounting is not allowed). The client gets a clear error, the
image keeps its previous version, no temp file is left, and the space is free again for
the next upload."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.test_images import (
    BOUNDARY,
    create,
    download,
    file_path,
    iso_payload,
    multipart,
    sha1,
)
from tests.api.test_images_files import temp_files

STORE_BYTES = 6 << 20


@pytest.fixture
def settings(settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
    store = os.path.join(settings["data_dir"], "images")
    os.makedirs(store)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_BYTES},mode=0750",
                                  "nano-test-images", store], capture_output=True, text=True)
        problem = mounted.stderr.strip() if mounted.returncode else ""
    except FileNotFoundError:
        problem = "no mount command"
    if problem:
        pytest.skip(f"cannot mount a small tmpfs for the image store: {problem}")
    settings["images"]["max_upload_bytes"] = 64 << 20
    try:
        yield settings
    finally:
        for _ in range(50):  # a worker thread may still be closing a file there
            if subprocess.run(["umount", store], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "--lazy", store], check=True)


async def post_file(api: Any, image_id: str, data: bytes) -> dict:
    response = await api.http.fetch(
        api.base + file_path("media", image_id), method="POST", raise_error=False,
        body=multipart([("image", "f.iso", data)]), request_timeout=60, headers={
            "Nano-Session": api.session,
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    return json.loads(response.body)


@pytest.mark.gen_test(timeout=60)
async def test_a_full_disk_refuses_the_upload_and_keeps_the_previous_version(api, settings):
    image_id = await create(api, "media", "m")
    old = iso_payload(1 << 20)
    assert (await post_file(api, image_id, old))["error_code"] == 0

    doc = await post_file(api, image_id, iso_payload(STORE_BYTES + (2 << 20)))
    assert doc["error_code"] == 500
    assert "cannot store the uploaded file" in doc["message"]
    assert "No space left on device" in doc["message"]

    data = await api.ok("GET", f"/media_images/{image_id}")
    assert (data["size"], data["checksum"], data["progress"]) == (len(old), sha1(old), 100)
    assert (await download(api, file_path("media", image_id))).body == old
    assert temp_files(settings) == []

    smaller = iso_payload(2 << 20)  # the space of the refused upload is free again
    doc = await post_file(api, image_id, smaller)
    assert doc["error_code"] == 0, doc["message"]
    assert (await download(api, file_path("media", image_id))).body == smaller
