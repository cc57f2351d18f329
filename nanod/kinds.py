"""Per-kind adapters of the manifest commands: how a kind is read by name through the REST
API, created, updated and deleted, which other resources its spec names, and how each field
change is classified (live, needs restart, replaces, destructive).

Used by nanod/manifests.py (planning and apply) and nanod/client_cli.py (get, export). Each
adapter is a small table: routes plus a few hooks; a kind whose API is not served by the
connected nanod is reported as such (`Kind.available`), never faked.

Specs are compared in manifest shape (names, not ids) with "given keys" semantics: only
fields a manifest states are compared (Ansible style), lists in order unless the field is
unordered, and write-only fields (passwords) are used on create but never compared.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

from nanod.client import ApiError, NanoClient
from reconciler.contract import Effect


@dataclass(frozen=True)
class Found:
    """A resource as the server has it: its id (the name for name-keyed kinds) and its spec
    in manifest shape."""

    id: str
    spec: Mapping[str, Any]
    etag: str = ""  # its generation when read (the ETag), for If-Match on the update


@dataclass
class ApplyContext:
    """What an apply knows beyond one document: the manifest's directory (image files),
    whether to wait for long work, and notes for the report."""

    base_dir: Path = Path(".")
    wait_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    if_match: str = ""  # the ETag the plan read; the first write of an update sends it

    def guard(self) -> dict[str, str]:
        """Headers of the first write of an update or delete: If-Match with the ETag the
        plan read, so a change someone made since is refused (409 naming who), never
        overwritten. Later writes of the same update follow our own first one."""
        tag, self.if_match = self.if_match, ""
        return {"If-Match": tag} if tag else {}


@dataclass(frozen=True)
class Reference:
    field: str
    kind: str
    name: str


class ManifestError(Exception):
    """A document cannot be applied as written (the message names the field)."""


def p(value: str) -> str:
    """A path segment, quoted."""
    return quote(str(value), safe="")


# -- comparison ---------------------------------------------------------------------------------


def matches(want: Any, have: Any, *, unordered: bool = False) -> bool:
    """Whether `have` satisfies `want` with given-keys semantics: a mapping matches when each
    key it states matches; a list when it has the same length and matching items (in any
    order when `unordered`); scalars when equal (an int equals the same float)."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            matches(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return False
        if not unordered:
            return all(matches(w, h) for w, h in zip(want, have, strict=True))
        left = list(have)
        for item in want:
            hit = next((i for i, h in enumerate(left) if matches(item, h)), None)
            if hit is None:
                return False
            left.pop(hit)
        return True
    if isinstance(want, bool) or isinstance(have, bool):
        return want is have or (want is None and have is None)
    return want == have


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- the adapter base -----------------------------------------------------------------------


class Kind:
    """One manifest kind. Subclasses fill the class attributes and the hooks."""

    kind: ClassVar[str]
    probe: ClassVar[str]  # a GET route that exists when this nanod serves the kind
    status_kind: ClassVar[str | None] = None  # its kind in /resource_status/, if reconciled
    effects: ClassVar[Mapping[str, Effect]] = {}
    unordered: ClassVar[frozenset[str]] = frozenset()
    write_only: ClassVar[frozenset[str]] = frozenset()
    local_only: ClassVar[frozenset[str]] = frozenset()  # fields of the manifest, not the API
    scoped_by: ClassVar[str | None] = None  # spec field that scopes the name (Guest: pool)

    def available(self, client: NanoClient) -> bool:
        return client.has_route(self.probe)

    # reading
    def names(self, client: NanoClient) -> list[str]:
        raise NotImplementedError

    def read(self, client: NanoClient, name: str, spec: Mapping[str, Any]) -> Found | None:
        """The resource named `name` (within `spec`'s scope, e.g. a guest's pool), or None."""
        raise NotImplementedError

    def listing(self, client: NanoClient) -> list[tuple[str, Found]]:
        """Every resource of this kind, for export and get."""
        out = []
        for name in self.names(client):
            found = self.read(client, name, {})
            if found is not None:
                out.append((name, found))
        return out

    # comparing
    def want(self, spec: Mapping[str, Any], ctx: ApplyContext) -> dict[str, Any]:
        """The desired spec in the shape `read` gives, without write-only fields."""
        return {k: v for k, v in spec.items() if k not in self.write_only}

    def changed(self, want: Mapping[str, Any], have: Mapping[str, Any]) -> list[str]:
        return sorted(k for k, v in want.items()
                      if not matches(v, have.get(k), unordered=k in self.unordered))

    def classify(self, name: str, before: Any, after: Any) -> tuple[Effect, str]:
        """How changing field `name` from `before` to `after` takes effect, and a note."""
        return self.effects.get(name, Effect.LIVE), ""

    def classify_changes(self, client: NanoClient, found: Found, want: Mapping[str, Any],
                         fields: list[str]) -> dict[str, tuple[Effect, str]]:
        """`classify` for every changed field (kinds whose server plans changes ask it)."""
        return {f: self.classify(f, found.spec.get(f), want.get(f)) for f in fields}

    def references(self, spec: Mapping[str, Any]) -> list[Reference]:
        return []

    def refusal(self, found: Found | None, spec: Mapping[str, Any], fields: list[str],
                effects: Mapping[str, Effect]) -> str:
        """Why applying `spec` (a create when `found` is None, else an update of `fields`,
        classified as `effects`) is refused before anything changes; "" when it is not.
        `apply --check` reports what the apply itself would refuse."""
        return ""

    # writing
    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        raise NotImplementedError

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        raise NotImplementedError

    def delete(self, client: NanoClient, name: str, found: Found, ctx: ApplyContext) -> None:
        raise NotImplementedError

    def export(self, found: Found) -> dict[str, Any]:
        """The spec a manifest should carry to reproduce `found`."""
        return dict(found.spec)


def _pick(data: Mapping[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: data[k] for k in keys if data and k in data}


class NamedKind(Kind):
    """A kind addressed by name in its path: GET/POST/PUT/DELETE {item}."""

    collection: ClassVar[str]
    item: ClassVar[str]  # with {name}
    fields: ClassVar[tuple[str, ...]]

    def names(self, client: NanoClient) -> list[str]:
        rows = client.ok("GET", self.collection) or []
        return [r if isinstance(r, str) else r["name"] for r in rows]

    def path(self, name: str) -> str:
        return self.item.format(name=p(name))

    def shape(self, data: Mapping[str, Any]) -> dict[str, Any]:
        return _pick(data, self.fields)

    def read(self, client: NanoClient, name: str, spec: Mapping[str, Any]) -> Found | None:
        data, tag = client.get_tagged(self.path(name))
        return None if data is None else Found(name, self.shape(data), tag)

    def body(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return _pick(spec, self.fields + tuple(self.write_only))

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        client.ok("POST", self.path(name), self.body(spec))

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        client.ok("PUT", self.path(name), _pick(spec, tuple(fields)), headers=ctx.guard())

    def delete(self, client: NanoClient, name: str, found: Found, ctx: ApplyContext) -> None:
        client.ok("DELETE", self.path(name), {}, headers=ctx.guard())


class IdKind(Kind):
    """A kind addressed by id, found by name in its listing: {collection} lists
    [{id, name, ...}], {item} with {id} reads, changes and deletes, POST {collection}
    creates and answers {id}."""

    collection: ClassVar[str]
    item: ClassVar[str]

    def rows(self, client: NanoClient) -> list[dict[str, Any]]:
        return list(client.ok("GET", self.collection) or [])

    def names(self, client: NanoClient) -> list[str]:
        return sorted({r["name"] for r in self.rows(client)})

    def find(self, client: NanoClient, name: str) -> dict[str, Any] | None:
        hits = [r for r in self.rows(client) if r.get("name") == name]
        if len(hits) > 1:
            mine = [r for r in hits if r.get("owner", r.get("user")) == client.config.user]
            hits = mine or hits
        return hits[0] if hits else None

    def path(self, ident: str) -> str:
        return self.item.format(id=p(ident))


# -- identity ---------------------------------------------------------------------------------


class RoleKind(NamedKind):
    kind = "Role"
    probe = "/roles/"
    collection, item, fields = "/roles/", "/roles/{name}", ("menu",)
    unordered = frozenset({"menu"})


class UserKind(NamedKind):
    kind = "User"
    probe = "/users/"
    collection, item, fields = "/users/", "/users/{name}", ("nick", "mail")
    write_only = frozenset({"password"})

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        if not spec.get("password"):
            raise ManifestError(f"spec.password: is required to create user {name!r} (it is "
                                "used only at creation)")
        super().create(client, name, spec, ctx)


class UserGroupKind(NamedKind):
    kind = "UserGroup"
    probe = "/user_groups/"
    collection, item, fields = "/user_groups/", "/user_groups/{name}", ("display",)
    unordered = frozenset({"roles", "members"})

    def shape(self, data: Mapping[str, Any]) -> dict[str, Any]:
        return {"display": data.get("display", ""), "roles": list(data.get("role") or []),
                "members": list(data.get("member") or [])}

    def references(self, spec: Mapping[str, Any]) -> list[Reference]:
        return ([Reference("roles", "Role", r) for r in spec.get("roles", [])]
                + [Reference("members", "User", u) for u in spec.get("members", [])])

    def _members(self, client: NanoClient, name: str, have: list[str], want: list[str]
                 ) -> None:
        for user in want:
            if user not in have:
                client.ok("POST", f"/user_groups/{p(name)}/members/{p(user)}", {})
        for user in have:
            if user not in want:
                client.ok("DELETE", f"/user_groups/{p(name)}/members/{p(user)}", {})

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        client.ok("POST", self.path(name), {"display": spec.get("display", ""),
                                            "role": list(spec.get("roles", []))})
        self._members(client, name, [], list(spec.get("members", [])))

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        body: dict[str, Any] = {}
        if "display" in fields:
            body["display"] = spec["display"]
        if "roles" in fields:
            body["role"] = list(spec["roles"])
        if body:
            client.ok("PUT", self.path(name), body)
        if "members" in fields:
            self._members(client, name, list(found.spec["members"]), list(spec["members"]))

    def delete(self, client: NanoClient, name: str, found: Found, ctx: ApplyContext) -> None:
        self._members(client, name, list(found.spec.get("members", [])), [])
        super().delete(client, name, found, ctx)


class VisibilityKind(Kind):
    """The visibility flags of the applying user's group (the only one the API changes);
    `state: absent` turns every flag off."""

    kind = "Visibility"
    probe = "/resource_visibilities/"
    flags = ("instance_visible", "media_image_visible", "disk_image_visible")

    def names(self, client: NanoClient) -> list[str]:
        if not client.login_group:
            client.login()
        return [client.login_group] if client.login_group else []

    def read(self, client: NanoClient, name: str, spec: Mapping[str, Any]) -> Found | None:
        if name not in self.names(client):
            raise ManifestError(f"name: {name!r} is not your group {client.login_group!r}: "
                                "the API changes the visibility of your own group only")
        data = client.ok("GET", "/resource_visibilities/") or {}
        return Found(name, {f: bool(data.get(f)) for f in self.flags})

    def _put(self, client: NanoClient, flags: Mapping[str, Any]) -> None:
        client.ok("PUT", "/resource_visibilities/", {f: True for f in self.flags if flags.get(f)})

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        self._put(client, spec)

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        self._put(client, {**found.spec, **spec})

    def delete(self, client: NanoClient, name: str, found: Found, ctx: ApplyContext) -> None:
        self._put(client, {})


class QuotaKind(Kind):
    """The quota of a user group, named after the group: GET/PUT/DELETE
    /user_groups/{name}/quota (api/quotas.py). Limits are numbers, 0 = unlimited; only the
    limits a manifest states are compared and changed. A group whose limits are all 0 has
    no quota: it reads as absent (unless the manifest itself states only zeros)."""

    kind = "Quota"
    probe = "/user_groups/-/quota"
    fields = ("cores", "memory", "disk", "guests", "image_storage")

    @staticmethod
    def path(name: str) -> str:
        return f"/user_groups/{p(name)}/quota"

    def names(self, client: NanoClient) -> list[str]:
        rows = client.ok("GET", "/user_groups/") or []
        return [r if isinstance(r, str) else r["name"] for r in rows]

    def read(self, client: NanoClient, name: str, spec: Mapping[str, Any]) -> Found | None:
        data = client.get(self.path(name))
        if data is None:
            return None  # no such group
        limits = {f: int((data.get("limits") or {}).get(f, 0)) for f in self.fields}
        if not any(limits.values()) and (not spec or any(spec.values())):
            return None
        return Found(name, limits)

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        client.ok("PUT", self.path(name), _pick(spec, self.fields))

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        client.ok("PUT", self.path(name), _pick(spec, tuple(fields)))

    def delete(self, client: NanoClient, name: str, found: Found, ctx: ApplyContext) -> None:
        client.ok("DELETE", self.path(name), {})


# -- compute ----------------------------------------------------------------------------------


class StoragePoolKind(NamedKind):
    kind = "StoragePool"
    probe = "/storage_pools/"
    status_kind = "StoragePool"
    collection, item = "/storage_pools/", "/storage_pools/{name}"
    fields = ("type", "host", "target")
    effects = {"host": Effect.RESTART, "target": Effect.RESTART}


class ComputePoolKind(NamedKind):
    kind = "ComputePool"
    probe = "/compute_pools/"
    status_kind = "ComputePool"
    collection, item = "/compute_pools/", "/compute_pools/{name}"
    fields = ("storage", "network", "failover", "enabled")
    effects = {"storage": Effect.RESTART, "network": Effect.RESTART}

    def references(self, spec: Mapping[str, Any]) -> list[Reference]:
        refs = []
        if spec.get("storage"):
            refs.append(Reference("storage", "StoragePool", spec["storage"]))
        if spec.get("network"):
            refs.append(Reference("network", "AddressPool", spec["network"]))
        return refs


CELL_FIELDS = ("address", "libvirt_uri", "virt_type", "storage_path", "bridge", "ssh",
               "overcommit")
CELL_NETWORK_WAIT = 60.0  # seconds a delete waits for the cell's pool network to be removed


class CellKind(NamedKind):
    """A cell (/cells/{name}) and its membership of a compute pool (/compute_pool_cells/)."""

    kind = "Cell"
    probe = "/cells/"
    status_kind = "Cell"
    collection, item = "/cells/", "/cells/{name}"
    fields = ("pool", "enabled", *CELL_FIELDS)
    effects = {"libvirt_uri": Effect.RESTART, "address": Effect.RESTART,
               "ssh": Effect.RESTART, "storage_path": Effect.RESTART,
               "pool": Effect.REPLACE}

    def shape(self, data: Mapping[str, Any]) -> dict[str, Any]:
        spec = dict(data.get("spec") or {})
        if isinstance(spec.get("ssh"), dict):
            spec["ssh"] = {k: v for k, v in spec["ssh"].items() if k != "password"}
        out = {k: spec[k] for k in CELL_FIELDS if k in spec}
        return {"pool": data.get("pool", ""), "enabled": bool(data.get("enabled", True)), **out}

    def want(self, spec: Mapping[str, Any], ctx: ApplyContext) -> dict[str, Any]:
        out = dict(spec)
        if isinstance(out.get("ssh"), dict):  # the password is write-only
            out["ssh"] = {k: v for k, v in out["ssh"].items() if k != "password"}
        out.setdefault("pool", "")
        return out

    def classify(self, name: str, before: Any, after: Any) -> tuple[Effect, str]:
        if name == "pool":
            return Effect.REPLACE, "moves the cell between compute pools"
        return super().classify(name, before, after)

    def references(self, spec: Mapping[str, Any]) -> list[Reference]:
        return [Reference("pool", "ComputePool", spec["pool"])] if spec.get("pool") else []

    def _join(self, client: NanoClient, name: str, pool: str) -> None:
        client.ok("POST", f"/compute_pool_cells/{p(pool)}/{p(name)}", {})

    def _leave(self, client: NanoClient, name: str, pool: str, ctx: ApplyContext) -> None:
        client.ok("DELETE", f"/compute_pool_cells/{p(pool)}/{p(name)}", {},
                  headers=ctx.guard())

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        client.ok("POST", self.path(name), _pick(spec, ("enabled", *CELL_FIELDS)))
        if spec.get("pool"):
            self._join(client, name, spec["pool"])

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        body = _pick(spec, tuple(f for f in fields if f != "pool"))
        if body:
            client.ok("PUT", self.path(name), body, headers=ctx.guard())
        if "pool" in fields:
            if found.spec.get("pool"):
                self._leave(client, name, found.spec["pool"], ctx)
            if spec.get("pool"):
                self._join(client, name, spec["pool"])

    def delete(self, client: NanoClient, name: str, found: Found, ctx: ApplyContext) -> None:
        """Leave the compute pool, wait until the network reconciler removed what the pool's
        address pool made on the cell (its libvirt network and NAT table), then unregister:
        an unregistered cell is forgotten, and nothing would remove them any more."""
        if found.spec.get("pool"):
            self._leave(client, name, found.spec["pool"], ctx)
            self._wait_networks_gone(client, name, max(ctx.wait_seconds, CELL_NETWORK_WAIT),
                                     ctx)
        super().delete(client, name, found, ctx)

    def _wait_networks_gone(self, client: NanoClient, name: str, seconds: float,
                            ctx: ApplyContext) -> None:
        deadline = time.monotonic() + seconds
        while True:
            data = client.get(self.path(name)) or {}
            observed = (data.get("status") or {}).get("observed") or {}
            owned = sorted((observed.get("address_network") or {}).get("owned") or {})
            if not owned:
                return
            if time.monotonic() >= deadline:
                ctx.notes.append(f"Cell/{name}: network(s) {', '.join(owned)} still on the "
                                 f"cell after {seconds:.0f} s (unreachable, or guests plugged "
                                 "in): left there")
                return
            time.sleep(0.5)


# -- networks and policies ---------------------------------------------------------------------


def _range_key(item: Mapping[str, Any]) -> tuple[str, str]:
    return (item.get("type") or "internal", item["start"])


class AddressPoolKind(NamedKind):
    kind = "AddressPool"
    probe = "/address_pools/"
    status_kind = "AddressPool"
    collection, item = "/address_pools/", "/address_pools/{name}"
    fields = ("gateway", "dns", "provider", "mode")
    unordered = frozenset({"ranges"})
    effects = {"gateway": Effect.RESTART, "mode": Effect.RESTART}

    def shape(self, data: Mapping[str, Any]) -> dict[str, Any]:
        ranges = [{"type": r.get("type", "internal"), "start": r["start"], "end": r["end"],
                   "netmask": r["netmask"]} for r in data.get("ranges") or []]
        return {**_pick(data, self.fields), "ranges": ranges}

    def want(self, spec: Mapping[str, Any], ctx: ApplyContext) -> dict[str, Any]:
        out = dict(spec)
        if "ranges" in out:
            out["ranges"] = [{"type": "internal", **r} for r in out["ranges"]]
        return out

    def classify(self, name: str, before: Any, after: Any) -> tuple[Effect, str]:
        if name == "ranges":
            kept = {_range_key(r): r for r in after or []}
            gone = [r for r in before or [] if not matches(kept.get(_range_key(r)), r)]
            if gone:
                return Effect.DESTRUCTIVE, "removes or changes ranges: " + ", ".join(
                    f"{r['start']}-{r['end']}" for r in gone)
        return super().classify(name, before, after)

    def _ranges(self, client: NanoClient, name: str, have: list[dict], want: list[dict],
                ctx: ApplyContext) -> None:
        wanted = {_range_key(r): r for r in want}
        held = {_range_key(r): r for r in have}
        for key, r in held.items():
            if key not in wanted or not matches(wanted[key], r):
                client.ok("DELETE", f"/address_pools/{p(name)}/{key[0]}/ranges/{p(key[1])}", {},
                          headers=ctx.guard())
        for key, r in wanted.items():
            if key not in held or not matches(r, held[key]):
                client.ok("POST", f"/address_pools/{p(name)}/{key[0]}/ranges/{p(key[1])}",
                          {"end": r["end"], "netmask": r["netmask"]})

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        client.ok("POST", self.path(name), _pick(spec, self.fields))
        self._ranges(client, name, [], self.want(spec, ctx).get("ranges", []), ctx)

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        body = _pick(spec, tuple(f for f in fields if f != "ranges"))
        if body:
            client.ok("PUT", self.path(name), body, headers=ctx.guard())
        if "ranges" in fields:
            self._ranges(client, name, list(found.spec["ranges"]),
                         self.want(spec, ctx)["ranges"], ctx)


class SecurityPolicyGroupKind(IdKind):
    kind = "SecurityPolicyGroup"
    probe = "/security_policy_groups/"
    status_kind = "SecurityPolicyGroup"
    collection, item = "/security_policy_groups/", "/security_policy_groups/{id}"
    fields = ("description", "enabled", "global", "default_action")

    def read(self, client: NanoClient, name: str, spec: Mapping[str, Any]) -> Found | None:
        row = self.find(client, name)
        if row is None:
            return None
        # the group itself, with its ETag, before its rules: a rule changed in between
        # makes the update refused (If-Match), never overwritten
        data, tag = client.get_tagged(self.path(row["id"]))
        if data is None:
            return None
        rules = client.ok("GET", self.path(row["id"]) + "/rules/") or []
        return Found(row["id"], {**_pick(data, self.fields), "rules": list(rules)}, tag)

    def classify(self, name: str, before: Any, after: Any) -> tuple[Effect, str]:
        if name == "rules":
            return Effect.LIVE, "rules are copied into guests when they are created"
        return super().classify(name, before, after)

    def _rules(self, client: NanoClient, ident: str, have: list[dict], want: list[dict],
               ctx: ApplyContext) -> None:
        base = self.path(ident) + "/rules/"
        for index, rule in enumerate(want):
            if index >= len(have):
                client.ok("POST", base, rule)  # a POST takes no If-Match
            elif not matches(rule, have[index]):
                client.ok("PUT", f"{base}{index}", rule, headers=ctx.guard())
        for index in range(len(have) - 1, len(want) - 1, -1):
            client.ok("DELETE", f"{base}{index}", {}, headers=ctx.guard())

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        ident = client.ok("POST", self.collection, {"name": name, **_pick(spec, self.fields)})
        self._rules(client, ident["id"], [], list(spec.get("rules", [])), ctx)

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        body = _pick(spec, tuple(f for f in fields if f != "rules"))
        if body:
            client.ok("PUT", self.path(found.id), body, headers=ctx.guard())
        if "rules" in fields:
            self._rules(client, found.id, list(found.spec["rules"]), list(spec["rules"]), ctx)

    def delete(self, client: NanoClient, name: str, found: Found, ctx: ApplyContext) -> None:
        client.ok("DELETE", self.path(found.id), {}, headers=ctx.guard())


# -- templates and images -----------------------------------------------------------------------

TEMPLATE_FIELDS = ("admin", "operating_system", "disk", "network", "display", "control", "usb",
                   "tablet")


class TemplateKind(IdKind):
    kind = "Template"
    probe = "/templates/"
    collection, item = "/templates/", "/templates/{id}"

    def read(self, client: NanoClient, name: str, spec: Mapping[str, Any]) -> Found | None:
        row = self.find(client, name)
        if row is None:
            return None
        data, tag = client.get_tagged(self.path(row["id"]))
        return None if data is None else Found(row["id"], _pick(data, TEMPLATE_FIELDS), tag)

    def classify(self, name: str, before: Any, after: Any) -> tuple[Effect, str]:
        return Effect.LIVE, "guests copy a template when created: existing ones keep theirs"

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        client.ok("POST", self.collection, {"name": name, **_pick(spec, TEMPLATE_FIELDS)})

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        client.ok("PUT", self.path(found.id), {"name": name, **found.spec,
                                               **_pick(spec, TEMPLATE_FIELDS)},
                  headers=ctx.guard())

    def delete(self, client: NanoClient, name: str, found: Found, ctx: ApplyContext) -> None:
        client.ok("DELETE", self.path(found.id), {}, headers=ctx.guard())


class ImageKind(IdKind):
    """Media and disk images: metadata through the image routes, the file uploaded when its
    SHA-1 differs from the server's `checksum` (compared as the field `file`)."""

    fields = ("description", "tags", "owner", "group")
    local_only = frozenset({"file"})
    unordered = frozenset({"tags"})

    def read(self, client: NanoClient, name: str, spec: Mapping[str, Any]) -> Found | None:
        row = self.find(client, name)
        if row is None:
            return None
        checksum = row.get("checksum") or ""
        return Found(row["id"], {**_pick(row, self.fields),
                                 "file": f"sha1:{checksum}" if checksum else None})

    def want(self, spec: Mapping[str, Any], ctx: ApplyContext) -> dict[str, Any]:
        out = dict(spec)
        if out.get("file"):
            path = (ctx.base_dir / out["file"]).resolve()
            if not path.is_file():
                raise ManifestError(f"spec.file: {path} is not a file")
            out["file"] = f"sha1:{sha1_of(path)}"
        return out

    def export(self, found: Found) -> dict[str, Any]:
        return {k: v for k, v in found.spec.items() if k != "file"}

    def _upload(self, client: NanoClient, ident: str, spec: Mapping[str, Any],
                ctx: ApplyContext) -> None:
        path = (ctx.base_dir / spec["file"]).resolve()
        fields = {"checksum": sha1_of(path)} if self.kind == "DiskImage" else {}
        client.upload(self.path(ident) + "/file/", path, fields=fields)

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        data = client.ok("POST", self.collection, {"name": name, **_pick(spec, self.fields)})
        if spec.get("file"):
            self._upload(client, data["id"], spec, ctx)

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        body = _pick(spec, tuple(f for f in fields if f != "file"))
        if body:
            client.ok("PUT", self.path(found.id), body)
        if "file" in fields:
            self._upload(client, found.id, spec, ctx)

    def delete(self, client: NanoClient, name: str, found: Found, ctx: ApplyContext) -> None:
        client.ok("DELETE", self.path(found.id), {})


class MediaImageKind(ImageKind):
    kind = "MediaImage"
    probe = "/media_images/"
    status_kind = "MediaImage"
    collection, item = "/media_images/", "/media_images/{id}"


class DiskImageKind(ImageKind):
    kind = "DiskImage"
    probe = "/disk_images/"
    status_kind = "DiskImage"
    collection, item = "/disk_images/", "/disk_images/{id}"


# -- guests -----------------------------------------------------------------------------------

GUEST_FIELDS = ("pool", "cell", "cores", "memory", "disks", "auto_start", "from_image", "qos",
                "owner", "group", "system", "template", "modules", "cloud_init",
                "security_policy_group", "network_address", "ethernet_address", "ports")
"""Guest fields a manifest states and the API reads back (how each change takes effect is
the server's knowledge: `POST /guests/{id}/plan`)."""
GUEST_DELETE_WAIT = 120.0  # seconds a delete waits for the reconciler to remove a guest
GUEST_LIVE_FIELDS = ("power", "media", "snapshots")  # applied through /instances/ routes
QOS_ROUTES = {"cpu_priority": "cpu", "write_speed": "disk", "write_iops": "disk",
              "read_speed": "disk", "read_iops": "disk", "receive_speed": "network",
              "send_speed": "network"}
# Guest spec field -> the kind its value names (ids on the wire, names in manifests).
GUEST_REFS = {"template": "Template", "from_image": "DiskImage",
              "security_policy_group": "SecurityPolicyGroup", "media": "MediaImage"}


class GuestKind(IdKind):
    """Guests, found by name within their pool. How each change takes effect (live, needs
    restart, replaces, destructive) is asked of the server, whose guest planner decides it
    (`POST /guests/{id}/plan`): e.g. more cores need a restart of a running guest and none of
    a stopped one; a new `from_image` resets the system disk (destructive); a smaller disk
    cannot be had (the API only compacts files) and fails; fields fixed at creation
    (template, modules, addresses, ...) replace the guest: it is deleted and created again.
    power, media and snapshots are reconciled live.

    `power: stopped` asks for an ACPI shutdown that the reconciler turns into a power-off
    when the guest ignores it for its grace period (`reconciler.stop_grace_seconds`, 60 s by
    default): the same stop as `/batch/stop_guest/`. A guest with an operating system shuts
    down cleanly; one without (still in its firmware, hung, no ACPI support) would ignore
    the plain shutdown of `DELETE /instances/{id}` forever, so a manifest saying `stopped`
    would never converge and `--wait` would always time out; a forced stop every time would
    cut the power of guests that could have shut down cleanly.

    The API takes snapshots of stopped guests and inserts media into running ones, so a
    guest being started gets its snapshots before the start and its media once it is
    observed running, one being stopped its media before the stop and its snapshots once it
    is observed stopped (within `--wait`; without it they follow at the next apply). A new
    guest (also a replacement) is created stopped, so one with media needs `power: running`:
    anything else is refused before the guest is created or the old one deleted."""

    kind = "Guest"
    probe = "/guest_search/"
    status_kind = "Guest"
    collection, item = "/guest_search/", "/guests/{id}"
    scoped_by = "pool"
    write_only = frozenset()
    unordered = frozenset({"snapshots", "modules", "ports"})

    def __init__(self, lookup: Callable[[str], Kind]) -> None:
        self._lookup = lookup

    def _ids(self, client: NanoClient, kind: str) -> dict[str, str]:
        """name -> id of every visible resource of a referenced kind."""
        adapter = self._lookup(kind)
        assert isinstance(adapter, IdKind)
        return {r["name"]: r["id"] for r in adapter.rows(client)}

    def rows(self, client: NanoClient, pool: str = "") -> list[dict[str, Any]]:
        query = f"?pool={p(pool)}" if pool else ""
        return list(client.get(f"/guest_search/{query}") or [])  # no such pool: no guests

    def names(self, client: NanoClient) -> list[str]:
        return [r["name"] for r in self.rows(client)]

    def _shape(self, client: NanoClient, row: Mapping[str, Any]) -> dict[str, Any]:
        names: dict[str, dict[str, str]] = {}

        def name_of(kind: str, ident: str) -> str:
            if not ident:
                return ""
            if kind not in names:
                names[kind] = {v: k for k, v in self._ids(client, kind).items()}
            return names[kind].get(ident, ident)

        spec = _pick(row, GUEST_FIELDS)
        for key in ("template", "from_image", "security_policy_group"):
            if key in spec:
                spec[key] = name_of(GUEST_REFS[key], spec[key])
        if isinstance(spec.get("cloud_init"), dict):
            spec["cloud_init"] = {k: v for k, v in spec["cloud_init"].items()
                                  if k != "admin_secret"}
        spec["power"] = "running" if row.get("running") else "stopped"
        source = row.get("media_source") if row.get("media_attached") else ""
        spec["media"] = name_of("MediaImage", source) if source else None
        if row.get("created"):
            snaps = client.get(f"/instances/{p(row['id'])}/snapshots/") or {}
            spec["snapshots"] = sorted(snaps)
        else:
            spec["snapshots"] = []
        return spec

    def read(self, client: NanoClient, name: str, spec: Mapping[str, Any]) -> Found | None:
        pool = spec.get("pool", "")
        hits = [r for r in self.rows(client, pool) if r["name"] == name]
        if not hits:
            return None
        # the guest's ETag, then the listing again for its spec: the tag is never newer
        # than what the plan compares, so a change in between fails the update (If-Match)
        # instead of being overwritten
        _, tag = client.get_tagged(self.path(hits[0]["id"]))
        again = [r for r in self.rows(client, pool) if r["id"] == hits[0]["id"]]
        if not again:
            return None
        return Found(again[0]["id"], self._shape(client, again[0]), tag)

    def listing(self, client: NanoClient) -> list[tuple[str, Found]]:
        return [(r["name"], Found(r["id"], self._shape(client, r))) for r in self.rows(client)]

    def want(self, spec: Mapping[str, Any], ctx: ApplyContext) -> dict[str, Any]:
        out = dict(spec)
        if isinstance(out.get("cloud_init"), dict):
            out["cloud_init"] = {k: v for k, v in out["cloud_init"].items()
                                 if k != "admin_secret"}
        return out

    def classify_changes(self, client: NanoClient, found: Found, want: Mapping[str, Any],
                         fields: list[str]) -> dict[str, tuple[Effect, str]]:
        """Asked of the server: `POST /guests/{id}/plan` runs the reconciler's own guest
        planner on the proposed values, so the CLI holds no copy of that knowledge. A field
        naming an image this apply has yet to create cannot be planned before it exists."""
        body: dict[str, Any] = {}
        later: dict[str, tuple[Effect, str]] = {}
        if "cell" in fields:  # a migration (state/migrations.py), not a field the planner has
            later["cell"] = (Effect.LIVE, "live migration" if found.spec.get("power") ==
                             "running" else "cold migration")
        for name in fields:
            if name == "cell":
                continue
            value = want.get(name)
            if name in GUEST_REFS and value:
                ident = self._ids(client, GUEST_REFS[name]).get(value)
                if ident is None:
                    later[name] = (Effect.LIVE if name == "media" else Effect.DESTRUCTIVE
                                   if name == "from_image" else Effect.REPLACE,
                                   f"{GUEST_REFS[name]} {value!r} is created by this apply: "
                                   "planned by the server once it exists")
                    continue
                value = ident
            body[name] = "" if name == "media" and value is None else value
        planned = client.ok("POST", f"/guests/{p(found.id)}/plan", body) if body else {}
        # a live change needs no explanation in a diff; the others say why
        out = {name: (Effect(item["effect"]),
                      "" if item["effect"] == Effect.LIVE else item["reason"])
               for name, item in (planned.get("fields") or {}).items()}
        return {**out, **later}

    def references(self, spec: Mapping[str, Any]) -> list[Reference]:
        refs = [Reference("pool", "ComputePool", spec["pool"])] if spec.get("pool") else []
        for key, kind in GUEST_REFS.items():
            if spec.get(key):
                refs.append(Reference(key, kind, spec[key]))
        return refs

    def _body(self, client: NanoClient, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, **_pick(spec, GUEST_FIELDS)}
        if "cloud_init" in spec:
            body["cloud_init"] = dict(spec["cloud_init"])
        for key in ("template", "from_image", "security_policy_group"):
            if body.get(key):
                ids = self._ids(client, GUEST_REFS[key])
                if body[key] not in ids:
                    raise ManifestError(f"spec.{key}: no {GUEST_REFS[key]} named {body[key]!r}")
                body[key] = ids[body[key]]
        body.setdefault("modules", [])
        return body

    def _wait_created(self, client: NanoClient, ident: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            reply = client.call("GET", self.path(ident))
            if reply.code == 0 and reply.status == 200 and (reply.data or {}).get("created"):
                return True
            if reply.code != 0 or time.monotonic() >= deadline:
                return False
            time.sleep(1.0)

    def create(self, client: NanoClient, name: str, spec: Mapping[str, Any],
               ctx: ApplyContext) -> None:
        self._creatable(spec)
        data = client.ok("POST", "/guests/", self._body(client, name, spec))
        later = [f for f in GUEST_LIVE_FIELDS if spec.get(f)]
        if spec.get("power") == "stopped":
            later.remove("power")
        if not later:
            return
        if not ctx.wait_seconds or not self._wait_created(client, data["id"], ctx.wait_seconds):
            ctx.notes.append(f"Guest/{name}: {', '.join(later)} follow once the guest is "
                             "created: apply again (or use --wait)")
            return
        found = Found(data["id"], self._shape(client, {"id": data["id"], "created": True,
                                                       **client.ok("GET", self.path(data["id"]))}))
        fields = [f for f in later if not matches(spec[f], found.spec.get(f),
                                                  unordered=f in self.unordered)]
        self._live(client, name, found, spec, fields, ctx)

    def _observed_running(self, client: NanoClient, ident: str) -> bool | None:
        """Whether the reconciler observed the guest running (None: not created, gone)."""
        reply = client.call("GET", self.path(ident))
        if reply.code != 0 or reply.status != 200:
            return None
        return bool((reply.data or {}).get("running"))

    def _wait_power(self, client: NanoClient, ident: str, running: bool,
                    seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self._observed_running(client, ident) is not running:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
        return True

    def _stop(self, client: NanoClient, ident: str) -> None:
        """A shutdown that becomes a power-off after the grace period (see the class)."""
        task = client.ok("POST", "/batch/stop_guest/", {"guest": [ident]})
        for entry in client.ok("GET", f"/batch/stop_guest/{p(task['id'])}") or []:
            if entry.get("status") == "fail":
                raise ManifestError(f"spec.power: cannot stop the guest: {entry.get('error')}")

    def _live(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
              fields: list[str], ctx: ApplyContext) -> None:
        """power, media, snapshots. Snapshots are taken of stopped guests and media goes into
        running ones: a guest being started gets its snapshots first and its media once it
        is observed running; one being stopped its media first and its snapshots once it is
        observed stopped."""
        if "power" not in fields:
            self._media_and_snapshots(client, found, spec, fields)
            return
        running = spec["power"] == "running"
        first, then = ("snapshots", "media") if running else ("media", "snapshots")
        self._media_and_snapshots(client, found, spec, [f for f in fields if f == first])
        if running:
            client.ok("POST", f"/instances/{p(found.id)}", {})
        else:
            self._stop(client, found.id)
        if then in fields:
            if not self._wait_power(client, found.id, running, ctx.wait_seconds):
                ctx.notes.append(f"Guest/{name}: {then} follow once the guest is "
                                 f"{spec['power']}: apply again (or use --wait)")
                return
            self._media_and_snapshots(client, found, spec, [then])

    def _media_and_snapshots(self, client: NanoClient, found: Found, spec: Mapping[str, Any],
                             fields: list[str]) -> None:
        ident = p(found.id)
        if "media" in fields:
            if spec.get("media"):
                media = self._ids(client, "MediaImage").get(spec["media"])
                if media is None:
                    raise ManifestError(f"spec.media: no MediaImage named {spec['media']!r}")
                client.ok("POST", f"/instances/{ident}/media", {"source": media, "type": 0})
            else:
                client.ok("DELETE", f"/instances/{ident}/media", {})
        if "snapshots" in fields:
            have, want = set(found.spec.get("snapshots") or []), list(spec["snapshots"])
            for snap in want:
                if snap not in have:
                    client.ok("POST", f"/instances/{ident}/snapshots/", {"name": snap})
            for snap in sorted(have - set(want)):
                client.ok("DELETE", f"/instances/{ident}/snapshots/{p(snap)}", {})

    @staticmethod
    def _creatable(spec: Mapping[str, Any]) -> None:
        """Refuse, before anything changes, what a new guest cannot get: it is created
        stopped, and the API inserts media into running guests only."""
        if spec.get("media") and spec.get("power") != "running":
            raise ManifestError(
                f"spec.media: a new guest is created stopped and media goes into running "
                f"guests only: a guest with media {spec['media']!r} needs power: running "
                "(or media: null)")

    def refusal(self, found: Found | None, spec: Mapping[str, Any], fields: list[str],
                effects: Mapping[str, Effect]) -> str:
        replaces = found is None or Effect.REPLACE in effects.values()
        try:
            if replaces:
                self._creatable(spec)
        except ManifestError as exc:
            return str(exc)
        return ""

    def update(self, client: NanoClient, name: str, found: Found, spec: Mapping[str, Any],
               fields: list[str], ctx: ApplyContext) -> None:
        classes = self.classify_changes(client, found, self.want(spec, ctx), fields)
        if Effect.REPLACE in {effect for effect, _ in classes.values()}:
            self._creatable(spec)
            client.ok("DELETE", self.path(found.id), {"force": True}, headers=ctx.guard())
            self._wait_gone(client, found.id, max(ctx.wait_seconds, GUEST_DELETE_WAIT))
            self.create(client, name, spec, ctx)
            return
        ident = p(found.id)
        if "disks" in fields:
            old, new = list(found.spec["disks"]), list(spec["disks"])
            for index, (before, after) in enumerate(zip(old, new, strict=True)):
                if after < before:
                    raise ManifestError(
                        f"spec.disks.{index}: cannot shrink disk {index} from {before} to "
                        f"{after} bytes (the API only compacts disk files)")
                if after > before:
                    client.ok("PUT", f"/guests/{ident}/disks/resize/{index}", {"size": after},
                              headers=ctx.guard())
        if "cores" in fields:
            client.ok("PUT", f"/guests/{ident}/cores", {"cores": spec["cores"]},
                      headers=ctx.guard())
        if "memory" in fields:
            client.ok("PUT", f"/guests/{ident}/memory", {"memory": spec["memory"]},
                      headers=ctx.guard())
        if "auto_start" in fields:
            client.ok("PUT", f"/guests/{ident}/auto_start", {"enable": spec["auto_start"]},
                      headers=ctx.guard())
        if "qos" in fields:
            groups: dict[str, dict[str, Any]] = {}
            have = found.spec.get("qos") or {}
            for key, value in spec["qos"].items():
                if have.get(key) != value:
                    groups.setdefault(QOS_ROUTES[key], {})[key] = value
            if "cpu" in groups:
                client.ok("PUT", f"/guests/{ident}/qos/cpu",
                          {"priority": groups["cpu"]["cpu_priority"]}, headers=ctx.guard())
            for route in ("disk", "network"):
                if route in groups:
                    client.ok("PUT", f"/guests/{ident}/qos/{route}", groups[route],
                              headers=ctx.guard())
        if "from_image" in fields:
            image = self._ids(client, "DiskImage").get(spec["from_image"])
            if image is None:
                raise ManifestError(f"spec.from_image: no DiskImage named {spec['from_image']!r}")
            client.ok("PUT", f"/guests/{ident}/system", {"from_image": image},
                      headers=ctx.guard())
        # moves, power, media and snapshots are operations, not the spec the ETag guards
        # (their routes are POSTs, or a snapshot's own): they follow unconditionally
        ctx.if_match = ""
        if "cell" in fields:
            self._migrate(client, name, found, spec["cell"], ctx)
        self._live(client, name, found, spec, [f for f in fields if f in GUEST_LIVE_FIELDS],
                   ctx)

    def _migrate(self, client: NanoClient, name: str, found: Found, cell: str,
                 ctx: ApplyContext) -> None:
        """A new `cell` moves the guest (POST /migrations/); with --wait until it moved."""
        started = client.ok("POST", "/migrations/", {
            "source_pool": found.spec["pool"], "source_cell": found.spec["cell"],
            "target_cell": cell, "instances": [found.id]})
        deadline = time.monotonic() + ctx.wait_seconds
        while ctx.wait_seconds:
            status = client.ok("GET", f"/migrations/{p(started['id'])}")
            if status.get("finished"):
                if status.get("error"):
                    raise ManifestError(f"spec.cell: the guest could not move to {cell!r}: "
                                        f"{status['error']}")
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        ctx.notes.append(f"Guest/{name}: moving to cell {cell} (migration {started['id']}); "
                         f"follow it with GET /api/v1/migrations/{started['id']}")

    def _wait_gone(self, client: NanoClient, ident: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while client.call("GET", self.path(ident)).code != 404:
            if time.monotonic() >= deadline:
                raise ManifestError(f"guest {ident} is still being deleted after {seconds:.0f} s "
                                    "(the reconciler removes it)")
            time.sleep(1.0)

    def delete(self, client: NanoClient, name: str, found: Found, ctx: ApplyContext) -> None:
        """Delete (stopping it first) and wait until the reconciler removed it, so what it
        used (its cell, pool, addresses) can be deleted next."""
        client.ok("DELETE", self.path(found.id), {"force": True}, headers=ctx.guard())
        try:
            self._wait_gone(client, found.id, max(ctx.wait_seconds, GUEST_DELETE_WAIT))
        except ManifestError as exc:
            ctx.notes.append(f"Guest/{name}: {exc}")

    def export(self, found: Found) -> dict[str, Any]:
        spec = dict(found.spec)
        for key in ("template", "from_image", "security_policy_group"):
            if not spec.get(key):
                spec.pop(key, None)
        return spec


# -- the table ---------------------------------------------------------------------------------

ORDER = ("Role", "User", "UserGroup", "Quota", "Visibility", "StoragePool", "AddressPool",
         "ComputePool", "Cell", "Template", "SecurityPolicyGroup", "MediaImage", "DiskImage", "Guest")
"""Creation order (what a kind names comes first); deletion runs backwards."""

ADAPTERS: dict[str, Kind] = {}


def adapter(kind: str) -> Kind:
    try:
        return ADAPTERS[kind]
    except KeyError:
        raise ManifestError(f"kind: {kind!r} is not a manifest kind; kinds: "
                            f"{', '.join(ORDER)}") from None


for _adapter in (RoleKind(), UserKind(), UserGroupKind(), QuotaKind(), VisibilityKind(),
                 StoragePoolKind(), AddressPoolKind(), ComputePoolKind(), CellKind(), TemplateKind(),
                 SecurityPolicyGroupKind(), MediaImageKind(), DiskImageKind(),
                 GuestKind(adapter)):
    ADAPTERS[_adapter.kind] = _adapter

__all__ = ["ADAPTERS", "ORDER", "ApiError", "ApplyContext", "Effect", "Found", "Kind",
           "ManifestError", "Reference", "adapter", "matches"]
