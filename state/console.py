"""What a monitor (VNC/SPICE) channel needs to know about a guest, for the console API.

Called by `api/console.py` when a channel is created; visibility rules are the guest
routes' (state/guests.py).
"""

from __future__ import annotations

from typing import Any

from state.errors import Conflict, NotFound
from state.guests import visible
from state.identity import SessionInfo
from state.models import Guest


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
