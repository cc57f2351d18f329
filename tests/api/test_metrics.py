"""GET /metrics and X-Request-Id on a real nanod, read the way a user would: scraped over
HTTP and parsed with prometheus_client's own parser (counts moved by the requests the test
made, a test-driver cell up, guests by phase), and a write's request id followed from the
reply header to its audit entry and to the reconcile it caused.

The in-process nanods (`server` fixture) run with their reconcilers; one test starts a
`nanod serve` child with a `metrics_token` and reads its log file.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
import tornado.httpclient
from prometheus_client.parser import text_string_to_metric_families

from tests.api.guest_helpers import guest_body
from tests.api.test_compute import register, until
from tests.api.test_images import create, download, file_path, make_iso, upload
from tests.api.test_restart import Nanod, free_port
from tests.conftest import ADMIN, ADMIN_PASSWORD, Api, reconciling, write_nanod_config

MiB = 1 << 20
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def settings(settings):
    return reconciling(settings, resync_seconds=2, probe_seconds=0.5, offline_after=2,
                       guest_poll_seconds=0.5)


async def scrape(base: str, token: str | None = None) -> tornado.httpclient.HTTPResponse:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await tornado.httpclient.AsyncHTTPClient().fetch(
        base + "/metrics", headers=headers, raise_error=False, request_timeout=30)


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def metrics(base: str) -> Samples:
    reply = await scrape(base)
    assert reply.code == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(reply.body.decode())


@pytest.mark.gen_test(timeout=120)
async def test_a_scrape_shows_requests_logins_cells_guests_and_image_bytes(api, server,
                                                                          tmp_path):
    base = f"http://127.0.0.1:{server.port}"
    refused = await api.call("POST", "/sessions/", {"user": ADMIN, "password": "Wr0ngGuess",
                                                    "nonce": "n"}, session="")
    assert refused.code == 401
    await register(api, tmp_path, "m-1", cpus=8, memory_gib=16)  # GETs /cells/m-1 until up
    await api.ok("POST", "/compute_pools/simp", {"storage": "", "network": "",
                                                  "failover": False})
    await api.ok("POST", "/compute_pool_cells/simp/m-1", None)
    gid = (await api.ok("POST", "/guests/", guest_body(
        "mg1", pool="simp", cores=1, memory=256 * MiB, disks=[64 * MiB])))["id"]
    assert (await api.call("GET", "/guests/no-such-guest")).code == 404
    iso = make_iso()
    media = await create(api, "media", "metrics_iso")
    assert (await upload(api, "media", media, iso)).code == 0
    assert (await download(api, file_path("media", media))).body == iso

    async def stopped() -> Samples | None:
        samples = await metrics(base)
        return samples if value(samples, "nano_guests", pool="simp", phase="stopped") else None

    samples = await until(stopped, timeout=30, what="the guest counted as stopped")
    assert value(samples, "nano_guests", pool="simp", phase="stopped") == 1
    assert sum(v for (name, _), v in samples.items() if name == "nano_guests") == 1
    assert (await api.ok("GET", f"/guests/{gid}"))["name"] == "mg1"

    assert value(samples, "nano_login_failures_total") == 1
    assert value(samples, "nano_api_requests_total", route="/api/v1/sessions", method="POST",
                 error_code="401") == 1
    assert value(samples, "nano_api_requests_total", route="/api/v1/cells/{}", method="POST",
                 error_code="0") == 1
    assert value(samples, "nano_api_requests_total", route="/api/v1/guests/{}", method="GET",
                 error_code="404") == 1
    assert value(samples, "nano_api_requests_total", route="/api/v1/compute_pool_cells/{}/{}",
                 method="POST", error_code="0") == 1
    assert value(samples, "nano_api_request_duration_seconds_count",
                 route="/api/v1/cells/{}", method="GET") >= 1
    routes = {dict(labels)["route"] for (name, labels) in samples
              if name == "nano_api_requests_total"}
    assert not [r for r in routes if "m-1" in r or gid in r or media in r], routes

    assert value(samples, "nano_cell_up", cell="m-1") == 1
    assert value(samples, "nano_cell_probe_duration_seconds_count", cell="m-1") >= 1
    assert value(samples, "nano_reconcile_duration_seconds_count", kind="cell",
                 result="ok") >= 1
    assert value(samples, "nano_reconcile_duration_seconds_count", kind="guest",
                 result="ok") >= 1
    assert value(samples, "nano_workqueue_depth") >= 0
    assert value(samples, "nano_workqueue_oldest_item_age_seconds") >= 0

    assert value(samples, "nano_image_transfer_bytes_total", direction="upload") == len(iso)
    assert value(samples, "nano_image_transfer_bytes_total", direction="download") == len(iso)
    assert value(samples, "nano_image_transfer_bytes_total", direction="to_cell") == 0


@pytest.mark.gen_test(timeout=60)
async def test_a_cell_that_does_not_answer_shows_down_beside_one_up(api, server, tmp_path):
    base = f"http://127.0.0.1:{server.port}"
    await register(api, tmp_path, "m-up")
    await api.ok("POST", "/cells/m-ghost", {"libvirt_uri": f"test://{tmp_path}/missing.xml",
                                            "virt_type": "qemu"})

    async def probed() -> Samples | None:
        rec = await api.ok("GET", "/cells/m-ghost")
        return await metrics(base) if rec["status"]["last_error"] else None

    samples = await until(probed, timeout=30, what="cell m-ghost probed")
    assert value(samples, "nano_cell_up", cell="m-ghost") == 0
    assert value(samples, "nano_cell_up", cell="m-up") == 1
    assert value(samples, "nano_cell_probe_duration_seconds_count", cell="m-ghost") >= 1


@pytest.mark.gen_test(timeout=60)
async def test_a_write_names_its_request_id_in_reply_audit_and_reconcile(api, caplog):
    caplog.set_level(logging.INFO, logger="reconciler.loop")
    reply = await api.call("POST", "/compute_pools/rq-pool",
                           {"storage": "", "network": "", "failover": False},
                           headers={"X-Request-Id": "it-req-42"})
    assert reply.code == 0 and reply.headers["X-Request-Id"] == "it-req-42"

    await api.ok("POST", "/logs/", {"content": "a note of mine"},
                 headers={"X-Request-Id": "it-note-1"})
    assert (await api.call("POST", "/sessions/", {"user": ADMIN, "password": "Wr0ngGuess",
                                                  "nonce": "n"}, session="",
                           headers={"X-Request-Id": "it-guess-1"})).code == 401

    logs = (await api.ok("GET", "/logs/?limit=50"))["logs"]
    mine = [e for e in logs if e["request_id"] == "it-req-42"]
    assert len(mine) == 1 and "rq-pool" in mine[0]["content"], logs
    assert set(mine[0]) == {"id", "time", "content", "user", "address", "resource",
                            "request_id"}
    by_id = {e["request_id"]: e["content"] for e in logs if e["request_id"]}
    assert by_id["it-note-1"] == "a note of mine"
    assert by_id["it-guess-1"].startswith(f"failed login for {ADMIN!r}")

    async def reconciled() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "reconciler.loop" and "it-req-42" in r.getMessage()]

    lines = await until(reconciled, timeout=20, what="the reconcile naming the request")
    assert lines[0].startswith("reconcile compute_pool/rq-pool for request it-req-42: ")


@pytest.mark.gen_test(timeout=30)
async def test_every_reply_carries_a_request_id_and_only_a_sane_one_is_taken(api):
    given = await api.call("GET", "/guests/", headers={"X-Request-Id": "client.id:7_x-1"})
    assert given.headers["X-Request-Id"] == "client.id:7_x-1"
    fresh = await api.call("GET", "/guests/")
    other = await api.call("GET", "/guests/")
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["X-Request-Id"])
    assert fresh.headers["X-Request-Id"] != other.headers["X-Request-Id"]
    for bad in ("has space", "x" * 65, "new\\nline", "quote\"d", "ünï"):
        reply = await api.call("GET", "/guests/", headers={"X-Request-Id": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", reply.headers["X-Request-Id"]), bad
    # errors too: an unknown route, a refused session, a malformed body
    assert (await api.call("GET", "/no/such/route", headers={"X-Request-Id": "e1"})
            ).headers["X-Request-Id"] == "e1"
    refused = await api.call("GET", "/guests/", session="nope", headers={"X-Request-Id": "e2"})
    assert refused.code == 401 and refused.headers["X-Request-Id"] == "e2"
    bad_body = await api.call("POST", "/compute_pools/x", raw=b"{not json",
                              headers={"X-Request-Id": "e3"})
    assert bad_body.code == 400 and bad_body.headers["X-Request-Id"] == "e3"


@pytest.fixture
def nanod(tmp_path: Any) -> Any:
    """A real `nanod serve` on its own SQLite store (the metrics do not depend on it)."""
    daemon = Nanod(tmp_path / "data", free_port(), None)
    write_nanod_config(tmp_path / "nanod.yaml", {"metrics_token": "s3cret-scrape"})
    yield daemon
    daemon.kill()


@pytest.mark.gen_test(timeout=90)
async def test_a_nanod_process_guards_metrics_with_its_token_and_logs_request_ids(nanod):
    await nanod.start()
    try:
        for token in (None, "", "wrong", "s3cret-scrap", "s3cret-scrape2"):
            refused = await scrape(nanod.url, token)
            assert refused.code == 401, token
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        api = Api(nanod.url)
        await api.ok("POST", "/system/", {"user": ADMIN, "password": ADMIN_PASSWORD},
                     session="")
        await api.login()
        reply = await api.call("POST", "/compute_pools/proc-pool",
                               {"storage": "", "network": "", "failover": False},
                               headers={"X-Request-Id": "proc-req-7"})
        assert reply.code == 0 and reply.headers["X-Request-Id"] == "proc-req-7"

        async def scraped() -> Samples | None:
            reply = await scrape(nanod.url, "s3cret-scrape")
            assert reply.code == 200
            samples = parse(reply.body.decode())
            done = value(samples, "nano_reconcile_duration_seconds_count",
                         kind="compute_pool", result="ok")
            return samples if done else None

        samples = await until(scraped, timeout=30, what="the pool reconciled")
        assert value(samples, "nano_api_requests_total", route="/api/v1/compute_pools/{}",
                     method="POST", error_code="0") == 1
        assert value(samples, "nano_api_requests_total", route="/api/v1/system",
                     method="POST", error_code="0") == 1

        async def logged() -> list[str]:
            return [line for line in nanod.output.read_text().splitlines()
                    if "proc-req-7" in line]

        lines = await until(logged, timeout=20, what="log lines naming the request")
        text = "\n".join(lines)
        assert re.search(r"nano\.access: 200 0 POST /api/v1/compute_pools/proc-pool .* "
                         r"request proc-req-7", text), text

        async def reconcile_logged() -> str | None:
            found = [line for line in await logged() if "reconcile compute_pool/proc-pool" in line]
            return found[0] if found else None

        line = await until(reconcile_logged, timeout=20, what="the reconcile's log line")
        assert line.endswith(" [request proc-req-7]"), line
    finally:
        assert await nanod.stop() == 0
