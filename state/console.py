"""Monitor (VNC/SPICE) channels for the console API: what a channel needs to know about a
guest, and the one-time channels themselves.

Called by `api/console.py`: `console_target` when a channel is asked for (visibility rules
are the guest routes', state/guests.py), `open_channel` to make it, and `take_channel`
when its websocket arrives. Channels live in the store (`MonitorChannel`), so the nanod
that made one and the nanod the websocket reaches may be different replicas of one store
(state/leases.py). Only SHA-256 of a channel id is kept: the id is the websocket's only
credential, and a copy of the database alone opens no console.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from state.db import db
from state.errors import Conflict, NotFound
from state.guests import visible
from state.identity import SessionInfo, token_digest
from state.models import Guest, MonitorChannel


class ConsoleStore:
    """Mixin of `state.store.Store`."""

    def console_target(self, session: SessionInfo, guest_id: str) -> dict[str, Any]:
        row = Guest.get_or_none((Guest.id == guest_id) & visible(session))
        if row is None:
            raise NotFound(f"no guest {guest_id!r} that you can see")
        obs, spec = row.observed or {}, row.spec or {}
        if not obs.get("running") or not obs.get("display_port"):
            raise Conflict(f"guest {row.name!r} is not running: start it to open its console")
        return {"guest": row.id, "name": row.name, "cell": row.cell,
                "port": int(obs["display_port"]), "secret": spec.get("monitor_secret", ""),
                "protocol": obs.get("display_protocol") or "vnc"}

    def open_channel(self, guest: str, cell: str, port: int, ttl: float) -> str:
        """A new one-time channel to `port` on `cell` for `ttl` seconds; returns its id
        (random, 24 URL-safe characters). Channels that expired unused go in the same
        transaction."""
        token = secrets.token_urlsafe(18)
        moment = time.time()
        with db.atomic():
            MonitorChannel.delete().where(MonitorChannel.expires_at <= moment).execute()
            MonitorChannel.create(token_hash=token_digest(token), guest=guest, cell=cell,
                                  port=port, expires_at=moment + ttl)
        return token

    def take_channel(self, token: str) -> dict[str, Any] | None:
        """The channel `token` names, {guest, cell, port}, removed in the same statement
        (DELETE ... RETURNING), so that of two websockets racing for it, on one replica or
        two, exactly one gets it; None when there is no such channel or it expired (an
        expired one is removed all the same)."""
        rows = list(MonitorChannel.delete()
                    .where(MonitorChannel.token_hash == token_digest(token))
                    .returning(MonitorChannel.guest, MonitorChannel.cell, MonitorChannel.port,
                               MonitorChannel.expires_at)
                    .dicts().execute())
        if not rows or rows[0]["expires_at"] <= time.time():
            return None
        row = rows[0]
        return {"guest": row["guest"], "cell": row["cell"], "port": int(row["port"])}
