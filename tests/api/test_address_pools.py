"""Address pools and address ranges through the v1 API, on SQLite and PostgreSQL: every
route's happy path with the contract's reply shapes, and the refusals (bad input, overlap,
outside the subnet, start after end, gateway inside a range, ranges and pools in use)."""

from __future__ import annotations

import pytest

from reconciler.contract import Key
from tests.conftest import Api

MASK = "255.255.255.0"
PASSWORD = "Us3rPassword"


async def user_with_menu(api: Api, name: str, menu: list[str]) -> str:
    """A session of a new user in its own group whose one role grants `menu`."""
    await api.ok("POST", f"/users/{name}", {"password": PASSWORD})
    await api.ok("POST", f"/roles/{name}_role", {"menu": menu})
    await api.ok("POST", f"/user_groups/{name}_group",
                 {"display": name, "role": [f"{name}_role"]})
    await api.ok("POST", f"/user_groups/{name}_group/members/{name}")
    data = await api.ok("POST", "/sessions/", {"user": name, "password": PASSWORD,
                                               "nonce": "n"}, session="")
    return data["session"]


async def make_pool(api: Api, name: str = "net", **spec: object) -> None:
    body = {"gateway": "172.16.3.254", "dns": ["8.8.8.8", "10.10.10.10"], **spec}
    await api.ok("POST", f"/address_pools/{name}", body)


@pytest.mark.gen_test(timeout=60)
async def test_address_pool_lifecycle(api, server):
    keys: list[Key] = []
    server.ctx.enqueue = keys.append
    assert await api.ok("GET", "/address_pools/") == []
    await make_pool(api, provider="cloudinit", mode="both")
    await api.ok("POST", "/address_pools/net/internal/ranges/172.16.3.1",
                 {"end": "172.16.3.18", "netmask": MASK})
    await api.ok("POST", "/address_pools/net/internal/ranges/172.16.3.20/",
                 {"end": "172.16.3.190", "netmask": MASK})
    await api.ok("POST", "/address_pools/net/external/ranges/172.16.3.200",
                 {"end": "172.16.3.209", "netmask": MASK})
    assert Key("address_pool", "net") in keys

    got = server.store.allocate_guest_addresses("guest-1", "net", requested="172.16.3.6")
    assert got == {"internal": "172.16.3.6", "external": "172.16.3.200"}

    assert await api.ok("GET", "/address_pools") == [{
        "name": "net", "gateway": "172.16.3.254", "provider": "cloudinit", "mode": "both",
        "addresses": 18 + 171 + 10, "allocated": 2}]
    status = await api.ok("GET", "/address_pools/net/")
    assert status == {
        "name": "net", "gateway": "172.16.3.254", "dns": ["8.8.8.8", "10.10.10.10"],
        "provider": "cloudinit", "mode": "both",
        "ranges": [
            {"start": "172.16.3.1", "end": "172.16.3.18", "netmask": MASK, "type": "internal"},
            {"start": "172.16.3.20", "end": "172.16.3.190", "netmask": MASK,
             "type": "internal"},
            {"start": "172.16.3.200", "end": "172.16.3.209", "netmask": MASK,
             "type": "external"},
        ],
        "allocated": [
            {"address": "172.16.3.6", "instance": "guest-1", "type": "internal"},
            {"address": "172.16.3.200", "instance": "guest-1", "type": "external"},
        ],
    }
    internal = await api.ok("GET", "/address_pools/net/internal/ranges/")
    assert [r["start"] for r in internal] == ["172.16.3.1", "172.16.3.20"]
    external = await api.ok("GET", "/address_pools/net/external/ranges")
    assert external == [{"start": "172.16.3.200", "end": "172.16.3.209", "netmask": MASK,
                         "type": "external"}]
    assert await api.ok("GET", "/address_pools/net/internal/ranges/172.16.3.1") == {
        "start": "172.16.3.1", "end": "172.16.3.18", "netmask": MASK, "type": "internal",
        "allocated": [{"address": "172.16.3.6", "instance": "guest-1", "type": "internal"}]}
    assert (await api.ok("GET", "/address_pools/net/internal/ranges/172.16.3.20"))[
        "allocated"] == []

    await api.ok("PUT", "/address_pools/net", {"gateway": "172.16.3.254", "dns": ["1.1.1.1"],
                                               "provider": "dhcp", "mode": "internal"})
    status = await api.ok("GET", "/address_pools/net")
    assert (status["dns"], status["provider"], status["mode"]) == (["1.1.1.1"], "dhcp",
                                                                   "internal")

    await api.ok("DELETE", "/address_pools/net/internal/ranges/172.16.3.20", {})
    server.store.release_guest_addresses("guest-1")
    await api.ok("DELETE", "/address_pools/net/internal/ranges/172.16.3.1")
    await api.ok("DELETE", "/address_pools/net/", {})
    assert await api.ok("GET", "/address_pools/") == []

    logs = [e["content"] for e in (await api.ok("GET", "/logs/?limit=100"))["logs"]]
    for words in ("created address pool net", "added internal range 172.16.3.1-172.16.3.18",
                  "modified address pool net", "removed internal range starting at 172.16.3.1",
                  "deleted address pool net"):
        assert any(words in entry for entry in logs), words


@pytest.mark.gen_test(timeout=60)
async def test_range_refusals(api):
    await make_pool(api)
    await api.ok("POST", "/address_pools/net/internal/ranges/172.16.3.10",
                 {"end": "172.16.3.50", "netmask": MASK})
    cases = [
        ("172.16.3.40", {"end": "172.16.3.60", "netmask": MASK}, 409, "overlaps"),
        ("172.16.4.1", {"end": "172.16.4.9", "netmask": MASK}, 400, "outside the subnet"),
        ("172.16.3.99", {"end": "172.16.3.90", "netmask": MASK}, 400, "is after end"),
        ("172.16.3.240", {"end": "172.16.3.254", "netmask": MASK}, 400, "gateway"),
        ("172.16.3.60", {"end": "172.16.3.70", "netmask": "255.255.0.0"}, 400, "differs"),
        ("172.16.3.60", {"end": "172.16.3.70", "netmask": "0.0.0.255"}, 400, "not a netmask"),
        ("172.16.3.60", {"end": "172.16.3.70"}, 400, "netmask: is required"),
        ("172.16.3.600", {"end": "172.16.3.70", "netmask": MASK}, 400, "not an IPv4"),
        ("172.16.3.60", {"end": "nope", "netmask": MASK}, 400, "end"),
    ]
    for start, body, code, words in cases:
        reply = await api.call("POST", f"/address_pools/net/internal/ranges/{start}", body)
        assert reply.code == code and words in reply.message, (start, body, reply)
    # the same start twice, and an external range over an internal one
    reply = await api.call("POST", "/address_pools/net/external/ranges/172.16.3.10",
                           {"end": "172.16.3.12", "netmask": MASK})
    assert reply.code == 409 and "overlaps" in reply.message
    # only internal and external ranges exist
    for method, body in (("GET", None), ("POST", {"end": "172.16.3.70", "netmask": MASK}),
                         ("DELETE", None)):
        reply = await api.call(method, "/address_pools/net/public/ranges/172.16.3.60", body)
        assert reply.code == 400 and "'public'" in reply.message, (method, reply)
    reply = await api.call("GET", "/address_pools/net/dmz/ranges/")
    assert reply.code == 400
    missing = await api.call("GET", "/address_pools/net/internal/ranges/172.16.3.60")
    assert missing.code == 404 and "no internal range starting at 172.16.3.60" in missing.message
    ranges = await api.ok("GET", "/address_pools/net/internal/ranges")
    assert ranges == [{"start": "172.16.3.10", "end": "172.16.3.50", "netmask": MASK,
                       "type": "internal"}]


@pytest.mark.gen_test(timeout=60)
async def test_allocations_protect_ranges_pools_and_the_gateway(api, server):
    await make_pool(api)
    await api.ok("POST", "/address_pools/net/internal/ranges/172.16.3.10",
                 {"end": "172.16.3.50", "netmask": MASK})
    server.store.allocate_guest_addresses("guest-1", "net")

    reply = await api.call("DELETE", "/address_pools/net/internal/ranges/172.16.3.10")
    assert reply.code == 409 and "1 allocated address" in reply.message
    assert "guest guest-1" in reply.message
    reply = await api.call("DELETE", "/address_pools/net")
    assert reply.code == 409 and "allocated" in reply.message
    reply = await api.call("PUT", "/address_pools/net", {"gateway": "172.16.3.1"})
    assert reply.code == 409 and "gateway can change only" in reply.message
    await api.ok("PUT", "/address_pools/net", {"mode": "both", "provider": "cloudinit"})

    server.store.release_guest_addresses("guest-1")
    await api.ok("POST", "/compute_pools/cp", {"network": "net"})
    reply = await api.call("DELETE", "/address_pools/net")
    assert reply.code == 409 and "used by compute pool(s) cp" in reply.message
    await api.ok("PUT", "/compute_pools/cp", {"network": ""})
    await api.ok("PUT", "/address_pools/net", {"gateway": "172.16.3.1"})
    await api.ok("DELETE", "/address_pools/net")


@pytest.mark.gen_test(timeout=60)
async def test_pool_bodies_and_names(api):
    cases = [
        ({}, "gateway: is required"),
        ({"gateway": "172.16.3"}, "gateway"),
        ({"gateway": "172.16.3.254", "dns": ["8.8.8.8", "dns.google"]}, "dns.1"),
        ({"gateway": "172.16.3.254", "dns": "8.8.8.8"}, "dns"),
        ({"gateway": "172.16.3.254", "provider": "static"}, "provider"),
        ({"gateway": "172.16.3.254", "mode": "bridge"}, "mode"),
        ({"gateway": "127.0.0.1"}, "cannot be a gateway"),
    ]
    for body, words in cases:
        reply = await api.call("POST", "/address_pools/net", body)
        assert reply.code == 400 and words in reply.message, (body, reply)
    reply = await api.call("POST", "/address_pools/bad%20name", {"gateway": "172.16.3.254"})
    assert reply.code == 400 and "invalid address pool name" in reply.message
    await make_pool(api)
    status = await api.ok("GET", "/address_pools/net")
    assert (status["provider"], status["mode"]) == ("dhcp", "internal")  # the defaults
    reply = await api.call("POST", "/address_pools/net", {"gateway": "172.16.3.254"})
    assert reply.code == 409 and "already exists" in reply.message
    for method in ("GET", "PUT", "DELETE"):
        reply = await api.call(method, "/address_pools/nope", {} if method == "PUT" else None)
        assert reply.code == 404 and "no address pool named 'nope'" in reply.message
    reply = await api.call("GET", "/address_pools/nope/internal/ranges")
    assert reply.code == 404


@pytest.mark.gen_test(timeout=60)
async def test_changes_need_the_address_pool_tag(api):
    await make_pool(api)
    viewer = await user_with_menu(api, "viewer", ["dashboard"])
    assert [p["name"] for p in await api.ok("GET", "/address_pools/", session=viewer)] == [
        "net"]
    await api.ok("GET", "/address_pools/net/internal/ranges", session=viewer)
    for method, path, body in (
        ("POST", "/address_pools/other", {"gateway": "10.0.0.1"}),
        ("PUT", "/address_pools/net", {"mode": "both"}),
        ("DELETE", "/address_pools/net", None),
        ("POST", "/address_pools/net/internal/ranges/172.16.3.1",
         {"end": "172.16.3.9", "netmask": MASK}),
    ):
        reply = await api.call(method, path, body, session=viewer)
        assert reply.code == 403 and "'address_pool'" in reply.message, (method, path)
    operator = await user_with_menu(api, "netop", ["address_pool"])
    await api.ok("POST", "/address_pools/net/internal/ranges/172.16.3.1",
                 {"end": "172.16.3.9", "netmask": MASK}, session=operator)
