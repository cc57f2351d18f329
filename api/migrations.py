"""Routes of the seed's "Migration" group: start a migration, follow one, list them.

A POST checks the request and stores the migration record in one transaction
(state/migrations.py: every refusal is made before anything moves), enqueues each guest it
moves for the guest reconciler (reconciler/migration.py drives the move on both cells) and
answers 202 with the id. `GET /migrations/{id}` answers HTTP 201 `{finished: false,
progress}` while guests move and 200 `{finished: true}` (plus `error` when a guest could not
move; it then runs where it was) once all are done; both carry the extension `guests`
(each guest's phase, percent, mode live|cold, target cell and error). Moving guests
between cells is the infrastructure's business: the 'compute_pool' menu tag.
"""

from __future__ import annotations

from api.base import NanoHandler, Resource, contract
from reconciler.contract import Key


class MigrationsHandler(NanoHandler):
    menu = "compute_pool"
    creates = True

    @contract(data="migration_list")
    def get(self) -> None:
        self.reply(self.store.migrations())

    @contract(data="created_id", body="migration")
    def post(self) -> None:
        body = self.body()
        assert self.session is not None  # prepare() refuses requests without a session
        mid, guests = self.store.start_migration(self.session, body)
        for guest_id in guests:
            self.ctx.enqueue(Key("guest", guest_id))
        self.audit(f"migration {mid}: moving {len(guests)} guest(s) from cell "
                   f"{body['source_cell']} to {body.get('target_cell') or 'cells placement picks'}"
                   f": {', '.join(guests)}")
        self.reply({"id": mid}, status=202)


class MigrationHandler(NanoHandler):
    menu = "compute_pool"
    resource = Resource("migration")

    @contract(data="migration_status")
    def get(self, mid: str) -> None:
        status = self.store.migration_status(mid)
        self.reply(status, status=200 if status["finished"] else 201)


ROUTES = [
    (r"/migrations", MigrationsHandler),
    (r"/migrations/([^/]+)", MigrationHandler),
]
