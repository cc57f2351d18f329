"""Compute and storage pool status derived from their cells (pure)."""

from reconciler.pools import compute_pool_status, storage_pool_status


def cell(name, alive=True, enabled=True):
    return {"name": name, "alive": alive, "enabled": enabled}


def test_compute_pool_status_table():
    base = {"enabled": True}
    assert compute_pool_status({**base, "cells": []})[:3] == ("empty", False, "NoCells")
    assert compute_pool_status({**base, "cells": [cell("a"), cell("b")]}) == (
        "ready", True, "AllCellsOnline", "2 of 2 cells online")
    assert compute_pool_status({**base, "cells": [cell("a"), cell("b", alive=False)]}) == (
        "degraded", True, "SomeCellsOffline", "1 of 2 cells online (offline: b)")
    phase, ready, reason, message = compute_pool_status(
        {**base, "cells": [cell("a", enabled=False), cell("b", alive=False)]})
    assert (phase, ready, reason) == ("unavailable", False, "NoUsableCell")
    assert "offline: b" in message
    assert compute_pool_status({"enabled": False, "cells": [cell("a")]})[:2] == ("disabled",
                                                                               True)


def test_storage_pool_status_table():
    assert storage_pool_status({"users": [], "cells": []})[:2] == ("unused", True)
    ok = {"users": ["p"], "cells": [{"cell": "a", "attached": True, "error": ""}]}
    assert storage_pool_status(ok) == ("ready", True, "Attached", "attached on 1 cell(s)")
    bad = {"users": ["p"], "cells": [{"cell": "a", "attached": True, "error": ""},
                                     {"cell": "b", "attached": False, "error": "mount failed"}]}
    assert storage_pool_status(bad) == ("degraded", False, "NotAttached", "b: mount failed")
