"""Routes of the seed's "Virtual machines" group (without guest security policies and
monitor channels) and "Search Guests": guests, instances, media, snapshots.

Every change is stored as desired state (state/guests.py documents the contract), its
guest is enqueued for the guest reconciler and an audit line is written; secrets (admin
passwords, monitor secrets) never reach the log. Changing guests needs the 'instance' menu
tag; every route answers "no guest" for guests the caller may not see.
"""

from __future__ import annotations

from api.base import NanoHandler, Resource, contract, query_bool
from reconciler.contract import Key
from state.identity import SessionInfo


class GuestHandlerBase(NanoHandler):
    menu: str | None = "instance"

    @property
    def caller(self) -> SessionInfo:
        assert self.session is not None  # prepare() refuses requests without a session
        return self.session

    def changed(self, guest_id: str, what: str) -> None:
        """Hand the guest to the reconciler and say what changed in the audit log."""
        self.ctx.enqueue(Key("guest", guest_id))
        self.audit(what)


class GuestSearchHandler(GuestHandlerBase):
    """GET /guest_search/?pool=&cell=&owner=&group=&status=&created="""

    @contract(data="guest_status_list", query=("pool", "cell", "owner", "group", "status", "created"))
    def get(self) -> None:
        arg = self.get_query_argument
        self.reply(self.store.guest_search(
            self.caller, pool=arg("pool", None), cell=arg("cell", None),
            owner=arg("owner", None), group=arg("group", None), status=arg("status", None),
            created=query_bool(self, "created")))


class SearchGuestsHandler(GuestHandlerBase):
    """POST /search/guests/: a read, so no menu tag is needed (visibility applies)."""

    menu = None

    @contract(data="guest_search_result", body="guest_search")
    def post(self) -> None:
        body = self.body()
        self.quiet()
        self.reply(self.store.search_guests(
            self.caller, limit=body.get("limit", 20), offset=body.get("offset", 0),
            pool=body.get("pool") or "", cell=body.get("cell") or "",
            keyword=body.get("keyword") or ""))


class GuestsHandler(GuestHandlerBase):
    creates = True

    @contract(data="created_id", body="guest_create")
    def post(self) -> None:
        guest = self.store.create_guest(self.caller, self.body())
        self.changed(guest["id"], f"created guest {guest['name']} ({guest['id']}) on cell "
                                  f"{guest['cell']}")
        self.reply({"id": guest["id"]}, status=202)


class GuestHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="guest_status")
    def get(self, guest_id: str) -> None:
        created, data = self.store.guest_status(self.caller, guest_id)
        self.reply(data, status=200 if created else 201)

    @contract(data="nothing", body="guest_delete")
    def delete(self, guest_id: str) -> None:
        force = bool(self.body().get("force", False))
        name = self.store.delete_guest(self.caller, guest_id, force=force)
        self.changed(guest_id, f"deleted guest {name} ({guest_id}){' with force' if force else ''}")
        self.reply()


class PlanHandler(GuestHandlerBase):
    """POST /guests/{id}/plan (extension): a dry run of the guest planner. The body names
    the fields a change would set (API shape); the reply gives, per field, how it would
    take effect (live, needs restart, replaces, destructive) and why, with the actions and
    holds the reconciler would plan. Changes nothing, so it needs no menu tag; visibility
    applies. `nanod apply --diff/--check` classify guest changes with it."""

    menu = None

    @contract(data="guest_plan_report", body="guest_plan", extension=True)
    async def post(self, guest_id: str) -> None:
        body = self.body()
        await self.stored(self.store.guest_status, self.caller, guest_id)  # unseen: 404
        self.quiet()
        self.reply(await self.blocking(self.ctx.extras["plan_guest"], guest_id, body))


class AutoStartHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="guest_auto_start")
    def put(self, guest_id: str) -> None:
        enable = self.body()["enable"]
        name = self.store.set_auto_start(self.caller, guest_id, enable)
        self.changed(guest_id, f"{'enabled' if enable else 'disabled'} auto start of guest "
                               f"{name} ({guest_id})")
        self.reply()


class CoresHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="guest_cores")
    def put(self, guest_id: str) -> None:
        body = self.body()
        name = self.store.set_cores(self.caller, guest_id, body["cores"],
                                    bool(body.get("immediate", False)))
        self.changed(guest_id, f"set cores of guest {name} ({guest_id}) to {body['cores']}")
        self.reply()


class MemoryHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="guest_memory")
    def put(self, guest_id: str) -> None:
        body = self.body()
        name = self.store.set_memory(self.caller, guest_id, body["memory"],
                                     bool(body.get("immediate", False)))
        self.changed(guest_id, f"set memory of guest {name} ({guest_id}) to {body['memory']} "
                               "bytes")
        self.reply()


class DiskResizeHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="guest_disk_resize")
    def put(self, guest_id: str, disk: str) -> None:
        body = self.body()
        name = self.store.resize_disk(self.caller, guest_id, disk, body["size"],
                                      bool(body.get("immediate", False)))
        self.changed(guest_id, f"resized disk {disk} of guest {name} ({guest_id}) to "
                               f"{body['size']} bytes")
        self.reply()


class DiskShrinkHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="guest_disk_shrink")
    def put(self, guest_id: str, disk: str) -> None:
        self.body()  # `immediate` means nothing: shrinking needs a stop
        name = self.store.shrink_disk(self.caller, guest_id, disk)
        self.changed(guest_id, f"asked to shrink disk {disk} of guest {name} ({guest_id})")
        self.reply()


class SystemHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="guest_system")
    def put(self, guest_id: str) -> None:
        image = self.body()["from_image"]
        name = self.store.reset_system(self.caller, guest_id, image)
        self.changed(guest_id, f"reset the system of guest {name} ({guest_id}) from disk "
                               f"image {image}")
        self.reply()


class AuthHandler(GuestHandlerBase):
    read_menu = "instance"  # reading a password is managing the guest
    resource = Resource("guest")

    @contract(data="guest_admin_auth")
    def get(self, guest_id: str) -> None:
        self.reply(self.store.guest_auth(self.caller, guest_id))

    @contract(data="guest_admin_auth", body="guest_auth")
    def put(self, guest_id: str) -> None:
        body = self.body()
        result = self.store.reset_password(self.caller, guest_id, body.get("user") or "",
                                           body.get("password") or "")
        self.changed(guest_id, f"reset the password of {result['user']} on guest "
                               f"{result['name']} ({guest_id})")
        self.reply({"user": result["user"], "password": result["password"]})


class NameHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="guest_name")
    def put(self, guest_id: str) -> None:
        new = self.body()["name"]
        old, _ = self.store.rename_guest(self.caller, guest_id, new)
        self.changed(guest_id, f"renamed guest {old} ({guest_id}) to {new}")
        self.reply()


class CpuQosHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="guest_qos_cpu")
    def put(self, guest_id: str) -> None:
        priority = self.body()["priority"]
        name = self.store.set_qos(self.caller, guest_id, {"cpu_priority": priority})
        self.changed(guest_id, f"set CPU priority of guest {name} ({guest_id}) to {priority}")
        self.reply()


class DiskQosHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="guest_qos_disk")
    def put(self, guest_id: str) -> None:
        values = self.body()
        name = self.store.set_qos(self.caller, guest_id, values)
        shown = ", ".join(f"{k} {v}" for k, v in sorted(values.items()))
        self.changed(guest_id, f"set disk QoS of guest {name} ({guest_id}): {shown}")
        self.reply()


class NetworkQosHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="guest_qos_network")
    def put(self, guest_id: str) -> None:
        values = self.body()
        name = self.store.set_qos(self.caller, guest_id, values)
        shown = ", ".join(f"{k} {v}" for k, v in sorted(values.items()))
        self.changed(guest_id, f"set network QoS of guest {name} ({guest_id}): {shown}")
        self.reply()


class MonitorSecretHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="no_fields", extension=True)
    def put(self, guest_id: str) -> None:
        self.body()  # the portal sends an empty body
        name = self.store.reset_monitor_secret(self.caller, guest_id)
        self.changed(guest_id, f"generated a new monitor secret for guest {name} ({guest_id})")
        self.reply()


class InstanceHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="guest_status")
    def get(self, guest_id: str) -> None:
        created, data = self.store.guest_status(self.caller, guest_id)
        self.reply(data, status=200 if created else 201)

    @contract(data="nothing", body="instance_start")
    def post(self, guest_id: str) -> None:
        body = self.body()
        name = self.store.start_guest(
            self.caller, guest_id, from_media=bool(body.get("from_media", False)),
            from_network=bool(body.get("from_network", False)), source=body.get("source") or "")
        how = (" from media " + body["source"] if body.get("from_media")
               else " from the network" if body.get("from_network") else "")
        self.changed(guest_id, f"started guest {name} ({guest_id}){how}")
        self.reply()

    @contract(data="nothing", body="instance_stop")
    def delete(self, guest_id: str) -> None:
        body = self.body()
        reboot, force = bool(body.get("reboot", False)), bool(body.get("force", False))
        name = self.store.stop_guest(self.caller, guest_id, reboot=reboot, force=force)
        verb = {(False, False): "stopped", (False, True): "force stopped",
                (True, False): "rebooted", (True, True): "reset"}[(reboot, force)]
        self.changed(guest_id, f"{verb} guest {name} ({guest_id})")
        self.reply()


class MediaHandler(GuestHandlerBase):
    resource = Resource("guest")

    @contract(data="nothing", body="instance_media")
    def post(self, guest_id: str) -> None:
        source = self.body()["source"]
        name = self.store.insert_media(self.caller, guest_id, source)
        self.changed(guest_id, f"inserted media {source} into guest {name} ({guest_id})")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, guest_id: str) -> None:
        self.body()
        name = self.store.eject_media(self.caller, guest_id)
        self.changed(guest_id, f"ejected media from guest {name} ({guest_id})")
        self.reply()


class SnapshotsHandler(GuestHandlerBase):
    creates = True
    resource = Resource("guest")

    @contract(data="snapshot_tree")
    def get(self, guest_id: str) -> None:
        self.reply(self.store.list_snapshots(self.caller, guest_id))

    @contract(data="nothing", body="snapshot_create")
    def post(self, guest_id: str) -> None:
        body = self.body()
        name = self.store.create_snapshot(self.caller, guest_id, body["name"],
                                          body.get("description") or "")
        self.changed(guest_id, f"created snapshot {body['name']} of guest {name} ({guest_id})")
        self.reply()

    @contract(data="nothing", body="snapshot_restore")
    def put(self, guest_id: str) -> None:
        target = self.body()["target"]
        name = self.store.restore_snapshot(self.caller, guest_id, target)
        self.changed(guest_id, f"restored guest {name} ({guest_id}) to snapshot {target}")
        self.reply()


class SnapshotHandler(GuestHandlerBase):
    resource = Resource("snapshot", (0, 1))

    @contract(data="snapshot_info")
    def get(self, guest_id: str, snapshot: str) -> None:
        self.reply(self.store.snapshot(self.caller, guest_id, snapshot))

    @contract(data="nothing", body="no_fields")
    def delete(self, guest_id: str, snapshot: str) -> None:
        self.body()
        name = self.store.delete_snapshot(self.caller, guest_id, snapshot)
        self.changed(guest_id, f"deleted snapshot {snapshot} of guest {name} ({guest_id})")
        self.reply()


ROUTES = [
    (r"/guest_search", GuestSearchHandler),
    (r"/search/guests", SearchGuestsHandler),
    (r"/guests", GuestsHandler),
    (r"/guests/([^/]+)", GuestHandler),
    (r"/guests/([^/]+)/plan", PlanHandler),
    (r"/guests/([^/]+)/auto_start", AutoStartHandler),
    (r"/guests/([^/]+)/cores", CoresHandler),
    (r"/guests/([^/]+)/memory", MemoryHandler),
    (r"/guests/([^/]+)/disks/resize/([^/]+)", DiskResizeHandler),
    (r"/guests/([^/]+)/disks/shrink/([^/]+)", DiskShrinkHandler),
    (r"/guests/([^/]+)/system", SystemHandler),
    (r"/guests/([^/]+)/auth", AuthHandler),
    (r"/guests/([^/]+)/name", NameHandler),
    (r"/guests/([^/]+)/qos/cpu", CpuQosHandler),
    (r"/guests/([^/]+)/qos/disk", DiskQosHandler),
    (r"/guests/([^/]+)/qos/network", NetworkQosHandler),
    (r"/guests/([^/]+)/monitor/secret", MonitorSecretHandler),
    (r"/instances/([^/]+)", InstanceHandler),
    (r"/instances/([^/]+)/media", MediaHandler),
    (r"/instances/([^/]+)/snapshots", SnapshotsHandler),
    (r"/instances/([^/]+)/snapshots/([^/]+)", SnapshotHandler),
]
