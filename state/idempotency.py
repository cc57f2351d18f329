"""Idempotency keys: the first reply to a create kept in the store, so a retry of the same
POST (same caller, route, key and body) gets it back instead of making a second resource.

Called by `api/base.py` (`NanoHandler`, for routes that declare `creates = True`). A route
that runs in the store lane runs inside `create_once`: claim, create and keep the reply in
one transaction. A coroutine route (it awaits other work between its store calls) claims
first, then keeps its reply, or releases the key when it failed (an error reply changed
nothing, so the key is free again); a crash in between leaves its key "in progress" until
it is trimmed. Rows live in the database, not
in memory, so they hold across a restart and across replicas sharing the database; rows
older than `KEY_LIFETIME` are trimmed by the next claim.

The claim is an INSERT on the row's primary key: of two concurrent first requests exactly
one inserts (SQLite serializes writers; PostgreSQL makes the second insert wait for the
first transaction, then fail), and the other reads what the first stored.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import peewee

from state.db import db
from state.models import IdempotencyKey
from state.policies import write_transaction

KEY_LIFETIME = 24 * 3600.0
"""Seconds a key and its reply are kept (a retry after that is a new request)."""


class Claimed(StrEnum):
    NEW = "new"  # this request runs; keep() or release() follows
    DONE = "done"  # answered before: `status` and `reply` are that answer
    PENDING = "pending"  # the first request with this key is still being handled
    OTHER_BODY = "other_body"  # the key was used with another body


@dataclass(frozen=True)
class Claim:
    outcome: Claimed
    scope: str
    status: int = 0
    reply: str = ""
    age: float = 0.0  # seconds since the key was first claimed


def key_scope(user: str, route: str, key: str) -> str:
    """The row's id: one key means one thing per caller and route."""
    return hashlib.sha256(json.dumps([user, route, key]).encode()).hexdigest()


class IdempotencyStore:
    """Mixin of `state.store.Store`."""

    def claim_idempotency(self, user: str, route: str, key: str, body_hash: str) -> Claim:
        """Claim `key` for this request, or say what the first request with it did."""
        scope = key_scope(user, route, key)
        now = time.time()
        IdempotencyKey.delete().where(IdempotencyKey.created < now - KEY_LIFETIME).execute()
        for _ in range(3):  # an insert lost to a concurrent one reads the winner's row
            row = IdempotencyKey.get_or_none(IdempotencyKey.scope == scope)
            if row is None:
                try:
                    with db.atomic():
                        IdempotencyKey.create(scope=scope, user=user, route=route,
                                              body_hash=body_hash, created=now)
                except peewee.IntegrityError:
                    continue
                return Claim(Claimed.NEW, scope)
            age = now - row.created
            if row.body_hash != body_hash:
                return Claim(Claimed.OTHER_BODY, scope, age=age)
            if row.status is None:
                return Claim(Claimed.PENDING, scope, age=age)
            return Claim(Claimed.DONE, scope, row.status, row.reply or "", age)
        raise RuntimeError(f"idempotency key of {route}: the row vanished three times")

    def create_once(self, user: str, route: str, key: str, body_hash: str,
                    create: Callable[[], tuple[int, str] | None]) -> Claim:
        """Claim `key`, run `create` (store calls; it returns the reply to keep, or None
        for an error reply, which is not kept) and keep its reply, all in one transaction:
        a crash in between leaves neither the resource nor the key. A concurrent request
        with the same key waits for this transaction (SQLite's write lock; PostgreSQL's
        wait on the key's primary key) and then reads the reply kept here. Returns the
        claim: NEW when `create` ran, else what the first request left."""
        with write_transaction():
            claim = self.claim_idempotency(user, route, key, body_hash)
            if claim.outcome is not Claimed.NEW:
                return claim
            reply = create()
            if reply is None:
                self.release_idempotency(claim.scope)
            else:
                self.keep_idempotent_reply(claim.scope, *reply)
            return claim

    def idempotent_reply(self, scope: str) -> Claim | None:
        """What a claimed key holds now (None when its request failed and released it)."""
        row = IdempotencyKey.get_or_none(IdempotencyKey.scope == scope)
        if row is None:
            return None
        age = time.time() - row.created
        if row.status is None:
            return Claim(Claimed.PENDING, scope, age=age)
        return Claim(Claimed.DONE, scope, row.status, row.reply or "", age)

    def keep_idempotent_reply(self, scope: str, status: int, reply: str) -> None:
        """The first request's answer, for its retries."""
        (IdempotencyKey.update(status=status, reply=reply)
         .where(IdempotencyKey.scope == scope).execute())

    def release_idempotency(self, scope: str) -> None:
        """The first request failed: nothing was made, a retry runs afresh."""
        (IdempotencyKey.delete()
         .where((IdempotencyKey.scope == scope) & IdempotencyKey.status.is_null()).execute())
