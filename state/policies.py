"""Security policies in the store: security policy groups (templates of rules, shared by
owner, group or globally) and each guest's own policy (default action + ordered rules).
Rules are checked by `validate_rule` (the firewall renderer's check, reconciler/firewall.py).

Called by the API (`api/policies.py`), by guest creation (`copy_policy_to_guest`) and by the
firewall reconciler (`guest_policy`). `PolicyStore` is a base of `state.networks.NetworkStore`.
Rule lists are edited under a row lock (PostgreSQL) in one transaction, so two concurrent
edits never lose one another; each guest policy change bumps `GuestPolicy.generation`.

Visibility: a policy group is visible to its owner, to members of its group, to everyone
when global, and to holders of the 'user' menu tag (administrators); the same people but
not everyone-through-global may change it. A guest is visible to its owner, and to members
of its group when the group's `instance_visible` flag is on; others get 404.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import peewee

from state.db import db
from state.errors import Conflict, Forbidden, Invalid, NotFound
from state.identity import SessionInfo
from state.models import Guest, GuestPolicy, SecurityPolicyGroup, User, UserGroup, now

# The one check of a rule lives with the renderer that must accept it; it is pure (no I/O),
# so the store may use it although state/ otherwise never imports the reconciler.
from state.rules import ACTIONS
from state.rules import validate_rule as firewall_rule

DIRECTIONS = ("up", "down")
ADMIN_TAG = "user"


# -- transactions (shared with state/networks.py; candidates for state/db.py) ------------------


def locked(query: peewee.Select, mode: str = "FOR UPDATE") -> peewee.Select:
    """Row lock on PostgreSQL; SQLite serializes writers itself and has no FOR UPDATE."""
    if not db.obj.for_update:
        return query
    return query.for_update(mode)  # type: ignore[arg-type]  # peewee takes the clause text


def write_transaction() -> AbstractContextManager[Any]:
    """For a read-then-write: a savepoint inside the caller's transaction, or a new
    transaction. On SQLite a new one begins IMMEDIATE: it takes the write lock before its
    first read, so concurrent writers wait (busy_timeout) instead of failing with "database
    is locked" when their read snapshot went stale."""
    if db.transaction_depth() == 0 and isinstance(db.obj, peewee.SqliteDatabase):
        return db.atomic(lock_type="IMMEDIATE")
    return db.atomic()


# -- pure rule checks ------------------------------------------------------------------------


def validate_rule(rule: Any) -> dict[str, Any]:
    """A SecurityPolicyRule checked and made canonical by the firewall's own check (so the
    store never holds a rule the nftables renderer would refuse), as the API shows it:
    {action, protocol, to_port, [from_address], interface}; from_address is left out when
    any source matches. Raises Invalid naming every bad or unknown field."""
    return firewall_rule(rule).to_api()


def _check_action(action: Any, field: str = "default_action") -> str:
    if action not in ACTIONS:
        raise Invalid(f"{field}: {action!r} is not one of {', '.join(ACTIONS)}")
    return action


def _at(rules: list[dict], index: int, where: str) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise Invalid(f"rule index {index!r}: must be a whole number from 0")
    if index >= len(rules):
        span = f" (0-{len(rules) - 1})" if rules else ""
        raise NotFound(f"{where} has no rule {index}: it has {len(rules)} rule(s){span}")
    return index


def insert_rule(rules: list[dict], rule: Any) -> list[dict]:
    return [*rules, validate_rule(rule)]


def replace_rule(rules: list[dict], index: int, rule: Any, where: str) -> list[dict]:
    out = list(rules)
    out[_at(rules, index, where)] = validate_rule(rule)
    return out


def move_rule(rules: list[dict], index: int, direction: str, where: str) -> list[dict]:
    """Swap rule `index` with its neighbour; the first cannot go up nor the last down."""
    if direction not in DIRECTIONS:
        raise Invalid(f"direction: {direction!r} is not 'up' or 'down'")
    _at(rules, index, where)
    if direction == "up" and index == 0:
        raise Invalid("rule 0 is already the first: it cannot move up")
    if direction == "down" and index == len(rules) - 1:
        raise Invalid(f"rule {index} is already the last: it cannot move down")
    other = index - 1 if direction == "up" else index + 1
    out = list(rules)
    out[index], out[other] = out[other], out[index]
    return out


def remove_rule(rules: list[dict], index: int, where: str) -> list[dict]:
    out = list(rules)
    del out[_at(rules, index, where)]
    return out


# -- visibility --------------------------------------------------------------------------------


def _admin(viewer: SessionInfo | None) -> bool:
    return viewer is None or viewer.allows(ADMIN_TAG)


def sees_guest(row: Guest, viewer: SessionInfo | None) -> bool:
    if viewer is None or row.owner == viewer.user:
        return True
    return bool(row.group) and row.group == viewer.group and bool(
        viewer.visibility.get("instance_visible"))


def _sees_group(row: SecurityPolicyGroup, viewer: SessionInfo | None) -> bool:
    return row.is_global or _may_change_group(row, viewer)


def _may_change_group(row: SecurityPolicyGroup, viewer: SessionInfo | None) -> bool:
    if _admin(viewer):
        return True
    assert viewer is not None
    return row.owner == viewer.user or bool(row.group) and row.group == viewer.group


def _group_dict(row: SecurityPolicyGroup) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "description": row.description, "user": row.owner,
            "group": row.group, "enabled": row.enabled, "global": row.is_global,
            "default_action": row.default_action}


class PolicyStore:
    """Security policy groups and guest security policies (a base of NetworkStore)."""

    # -- guests ---------------------------------------------------------------------------

    def _policy_guest(self, guest_id: str, viewer: SessionInfo | None = None) -> Guest:
        row = Guest.get_or_none(Guest.id == guest_id)
        if row is None or not sees_guest(row, viewer):
            raise NotFound(f"no guest with id {guest_id!r}")
        return row

    def security_policy_guest(self, guest_id: str,
                              viewer: SessionInfo | None = None) -> dict[str, str]:
        """{id, cell, pool} of a guest `viewer` may see (NotFound otherwise): what the API
        needs to authorize a policy change and to enqueue the firewall of its cell."""
        row = self._policy_guest(guest_id, viewer)
        return {"id": row.id, "cell": row.cell, "pool": row.pool}

    def guest_policy(self, guest_id: str) -> dict[str, Any]:
        """{default_action, rules} of a guest; without a policy of its own: accept, no rules."""
        self._policy_guest(guest_id)
        row = GuestPolicy.get_or_none(GuestPolicy.guest == guest_id)
        if row is None:
            return {"default_action": "accept", "rules": []}
        return {"default_action": row.default_action, "rules": list(row.rules or [])}

    def _edit_guest_policy(self, guest_id: str,
                           edit: Callable[[str, list[dict]], tuple[str, list[dict]]]) -> None:
        """Read-modify-write of a guest's policy in one transaction, the row locked."""
        with write_transaction():
            self._policy_guest(guest_id)
            row = locked(GuestPolicy.select().where(GuestPolicy.guest == guest_id)).first()
            if row is None:
                try:
                    with db.atomic():
                        row = GuestPolicy.create(guest=guest_id, generation=0)
                except peewee.IntegrityError:  # created concurrently: use that one
                    row = locked(GuestPolicy.select().where(GuestPolicy.guest == guest_id)).get()
            row.default_action, row.rules = edit(row.default_action, list(row.rules or []))
            row.generation += 1
            row.save()

    def copy_policy_to_guest(self, group_id: str, guest_id: str) -> None:
        """Give the guest a copy of an enabled policy group's default action and rules (later
        changes of the group do not follow). Visibility of the group is the caller's check
        (`security_policy_group(group_id, viewer)`). Runs in the caller's transaction."""
        with write_transaction():
            group = SecurityPolicyGroup.get_or_none(SecurityPolicyGroup.id == group_id)
            if group is None:
                raise NotFound(f"no security policy group with id {group_id!r}")
            if not group.enabled:
                raise Conflict(f"security policy group {group.name!r} ({group_id}) is "
                               "disabled: enable it or choose another")
            rules = [validate_rule(r) for r in group.rules or []]
            self._edit_guest_policy(guest_id, lambda _a, _r: (group.default_action, rules))

    def set_guest_default_action(self, guest_id: str, action: str) -> None:
        _check_action(action, "action")
        self._edit_guest_policy(guest_id, lambda _a, rules: (action, rules))

    def append_guest_rule(self, guest_id: str, rule: dict[str, Any]) -> None:
        self._edit_guest_policy(guest_id, lambda a, rules: (a, insert_rule(rules, rule)))

    def modify_guest_rule(self, guest_id: str, index: int, rule: dict[str, Any]) -> None:
        where = f"the security policy of guest {guest_id}"
        self._edit_guest_policy(guest_id,
                                lambda a, rules: (a, replace_rule(rules, index, rule, where)))

    def move_guest_rule(self, guest_id: str, index: int, direction: str) -> None:
        where = f"the security policy of guest {guest_id}"
        self._edit_guest_policy(guest_id,
                                lambda a, rules: (a, move_rule(rules, index, direction, where)))

    def remove_guest_rule(self, guest_id: str, index: int) -> None:
        where = f"the security policy of guest {guest_id}"
        self._edit_guest_policy(guest_id, lambda a, rules: (a, remove_rule(rules, index, where)))

    # -- security policy groups -----------------------------------------------------------

    def _policy_group(self, group_id: str, viewer: SessionInfo | None = None, *,
                      change: bool = False, lock: bool = False) -> SecurityPolicyGroup:
        query = SecurityPolicyGroup.select().where(SecurityPolicyGroup.id == group_id)
        row = (locked(query) if lock else query).first()
        if row is None or not _sees_group(row, viewer):
            raise NotFound(f"no security policy group with id {group_id!r}")
        if change and not _may_change_group(row, viewer):
            raise Forbidden(f"security policy group {row.name!r} belongs to {row.owner} "
                            f"(group {row.group or '-'}): only they, their group or an "
                            "administrator may change it")
        return row

    def _owner_of(self, spec: dict[str, Any], viewer: SessionInfo | None,
                  current: tuple[str, str] | None) -> tuple[str, str]:
        """Owner and group of a policy group: the creator's (or the current ones); an
        administrator (or an internal caller) may name others in `user`/`group`."""
        if not _admin(viewer):
            assert viewer is not None
            return current or (viewer.user, viewer.group)
        base = current or ((viewer.user, viewer.group) if viewer else ("", ""))
        user = spec.get("user") or base[0]
        if user != base[0]:
            found = User.get_or_none(User.name == user)
            if found is None:
                raise Invalid(f"user: no user named {user!r}")
            default_group = found.group_id or ""
        else:
            default_group = base[1]
        group = spec.get("group") or default_group
        if group != base[1] and group and UserGroup.get_or_none(UserGroup.name == group) is None:
            raise Invalid(f"group: no user group named {group!r}")
        return user, group

    def create_security_policy_group(self, spec: dict[str, Any],
                                     viewer: SessionInfo | None = None) -> str:
        """Create a group (no rules yet) owned by the viewer; returns its id."""
        name = spec.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 128:
            raise Invalid("name: is required (1-128 characters)")
        owner, group = self._owner_of(spec, viewer, None)
        with write_transaction():
            if SecurityPolicyGroup.select().where((SecurityPolicyGroup.owner == owner)
                                                  & (SecurityPolicyGroup.name == name)).exists():
                raise Conflict(f"{owner or 'the system'} already has a security policy group "
                               f"named {name!r}: choose another name")
            group_id = str(uuid.uuid4())
            SecurityPolicyGroup.create(
                id=group_id, name=name, description=str(spec.get("description", "")),
                owner=owner, group=group, enabled=bool(spec.get("enabled", True)),
                is_global=bool(spec.get("global", False)),
                default_action=_check_action(spec.get("default_action", "accept")), rules=[])
        return group_id

    def security_policy_group(self, group_id: str,
                              viewer: SessionInfo | None = None) -> dict[str, Any]:
        return _group_dict(self._policy_group(group_id, viewer))

    def modify_security_policy_group(self, group_id: str, spec: dict[str, Any],
                                     viewer: SessionInfo | None = None) -> None:
        """Change the given fields (rules are changed through their own functions)."""
        with write_transaction():
            row = self._policy_group(group_id, viewer, change=True, lock=True)
            if "name" in spec:
                name = spec["name"]
                if not isinstance(name, str) or not name.strip() or len(name) > 128:
                    raise Invalid("name: must be 1-128 characters")
                row.name = name
            if "description" in spec:
                row.description = str(spec["description"])
            if "enabled" in spec:
                row.enabled = bool(spec["enabled"])
            if "global" in spec:
                row.is_global = bool(spec["global"])
            if "default_action" in spec:
                row.default_action = _check_action(spec["default_action"])
            row.owner, row.group = self._owner_of(spec, viewer, (row.owner, row.group))
            row.generation += 1
            row.modified_at = now()
            row.save()

    def delete_security_policy_group(self, group_id: str,
                                     viewer: SessionInfo | None = None) -> None:
        """Delete a group; guests that copied its rules keep their copies."""
        with write_transaction():
            self._policy_group(group_id, viewer, change=True, lock=True).delete_instance()

    def search_security_policy_groups(
        self, viewer: SessionInfo | None = None, *, enabled_only: bool = False,
        global_only: bool = False, owner: str | None = None, group: str | None = None,
    ) -> list[dict[str, Any]]:
        """The groups the viewer may see, narrowed by the filters, by name."""
        query = SecurityPolicyGroup.select()
        if not _admin(viewer):
            assert viewer is not None
            seen = (SecurityPolicyGroup.owner == viewer.user) | (SecurityPolicyGroup.is_global)
            if viewer.group:
                seen |= SecurityPolicyGroup.group == viewer.group
            query = query.where(seen)
        if enabled_only:
            query = query.where(SecurityPolicyGroup.enabled)
        if global_only:
            query = query.where(SecurityPolicyGroup.is_global)
        if owner:
            query = query.where(SecurityPolicyGroup.owner == owner)
        if group:
            query = query.where(SecurityPolicyGroup.group == group)
        return [_group_dict(r) for r in
                query.order_by(SecurityPolicyGroup.name, SecurityPolicyGroup.id)]

    # -- rules of a group -----------------------------------------------------------------

    def security_policy_rules(self, group_id: str,
                              viewer: SessionInfo | None = None) -> list[dict[str, Any]]:
        return list(self._policy_group(group_id, viewer).rules or [])

    def _edit_group_rules(self, group_id: str, viewer: SessionInfo | None,
                          edit: Callable[[list[dict], str], list[dict]]) -> None:
        with write_transaction():
            row = self._policy_group(group_id, viewer, change=True, lock=True)
            row.rules = edit(list(row.rules or []), f"security policy group {row.name!r}")
            row.generation += 1
            row.modified_at = now()
            row.save()

    def add_security_policy_rule(self, group_id: str, rule: dict[str, Any],
                                 viewer: SessionInfo | None = None) -> None:
        self._edit_group_rules(group_id, viewer, lambda rules, _w: insert_rule(rules, rule))

    def modify_security_policy_rule(self, group_id: str, index: int, rule: dict[str, Any],
                                    viewer: SessionInfo | None = None) -> None:
        self._edit_group_rules(group_id, viewer,
                               lambda rules, where: replace_rule(rules, index, rule, where))

    def move_security_policy_rule(self, group_id: str, index: int, direction: str,
                                  viewer: SessionInfo | None = None) -> None:
        self._edit_group_rules(group_id, viewer,
                               lambda rules, where: move_rule(rules, index, direction, where))

    def remove_security_policy_rule(self, group_id: str, index: int,
                                    viewer: SessionInfo | None = None) -> None:
        self._edit_group_rules(group_id, viewer,
                               lambda rules, where: remove_rule(rules, index, where))
