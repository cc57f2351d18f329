"""Routes of the seed's "Batch Creating/Deleting/Stopping Guest" groups.

A POST stores every guest change at once (state/batches.py), enqueues each guest for the
guest reconciler and answers 202 with the task id; a GET answers the entries with HTTP 202
while any is unfinished and 200 once all are (the portal polls until 200). Tasks are the
caller's own; starting one needs the 'instance' menu tag.
"""

from __future__ import annotations

from api.base import Contract, Resource, contract
from api.guests import GuestHandlerBase
from reconciler.contract import Key


class BatchHandler(GuestHandlerBase):
    menu = "instance"
    kind = ""
    resource = Resource("batch")

    @contract(data="batch_guest_status")
    def get(self, task_id: str) -> None:
        finished, entries = self.store.batch_status(self.caller, self.kind, task_id)
        self.reply(entries, status=200 if finished else 202)


class BatchCreateHandler(GuestHandlerBase):
    menu = "instance"
    creates = True

    @contract(data="created_id", body="batch_create_guest")
    def post(self) -> None:
        body = self.body()
        task_id, guests = self.store.batch_create_guests(self.caller, body)
        for guest in guests:
            self.ctx.enqueue(Key("guest", guest["id"]))
        names = ", ".join(g["name"] for g in guests)
        self.audit(f"batch {task_id}: created {len(guests)} guest(s) in compute pool "
                   f"{body['pool']}: {names}")
        self.reply({"id": task_id}, status=202)


class BatchCreateStatusHandler(BatchHandler):
    kind = "create_guest"
    contracts = {"GET": Contract(data="batch_create_status")}  # entries carry progress


class BatchDeleteHandler(GuestHandlerBase):
    menu = "instance"
    creates = True

    @contract(data="created_id", body="batch_delete_guest")
    def post(self) -> None:
        body = self.body()
        task_id, changed = self.store.batch_delete_guests(self.caller, body)
        for guest_id in changed:
            self.ctx.enqueue(Key("guest", guest_id))
        self.audit(f"batch {task_id}: deleting {len(changed)} of {len(body['guest'])} "
                   f"guest(s){' with force' if body.get('force') else ''}: {', '.join(changed)}")
        self.reply({"id": task_id}, status=202)


class BatchDeleteStatusHandler(BatchHandler):
    kind = "delete_guest"


class BatchStopHandler(GuestHandlerBase):
    menu = "instance"
    creates = True

    @contract(data="created_id", body="batch_stop_guest")
    def post(self) -> None:
        body = self.body()
        task_id, changed = self.store.batch_stop_guests(self.caller, body)
        for guest_id in changed:
            self.ctx.enqueue(Key("guest", guest_id))
        self.audit(f"batch {task_id}: stopping {len(changed)} guest(s): {', '.join(changed)}")
        self.reply({"id": task_id}, status=202)


class BatchStopStatusHandler(BatchHandler):
    kind = "stop_guest"


ROUTES = [
    (r"/batch/create_guest", BatchCreateHandler),
    (r"/batch/create_guest/([^/]+)", BatchCreateStatusHandler),
    (r"/batch/delete_guest", BatchDeleteHandler),
    (r"/batch/delete_guest/([^/]+)", BatchDeleteStatusHandler),
    (r"/batch/stop_guest", BatchStopHandler),
    (r"/batch/stop_guest/([^/]+)", BatchStopStatusHandler),
]
