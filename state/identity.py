"""Identity and access in the store: system init, users, groups, roles, sessions,
visibility and the audit log.

Called by the API handlers (`api/identity.py`) and by `nanod init`. Every function runs its
writes in one transaction and raises our errors (state/errors.py) with a message that says
what was wrong and how to fix it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import peewee
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from state.db import db
from state.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from state.models import GroupRole, LogEntry, Role, Session, User, UserGroup, now

MENU_TAGS = (
    "dashboard",
    "compute_pool",
    "address_pool",
    "storage_pool",
    "instance",
    "image",
    "media",
    "templates",
    "policies",
    "user",
    "log",
    "visibility",
)
VISIBILITY_FLAGS = ("instance_visible", "media_image_visible", "disk_image_visible")
NAME_RULE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
ALREADY_INITIALIZED = ("the system is already initialized: POST /system/ is closed; log in with "
                       "POST /sessions/ (an administrator adds users with POST /users/{name})")

# The argon2id cost (the `password_hash` setting): argon2-cffi's defaults, RFC 9106's
# low-memory profile, unless set; never below OWASP's least for argon2id (19 MiB, 2
# passes, 1 lane). A hash made with another cost is made again at its user's next login.
PASSWORD_HASH_DEFAULTS = {"time_cost": 3, "memory_kib": 65536, "parallelism": 4}
PASSWORD_HASH_LEAST = {"time_cost": 2, "memory_kib": 19456, "parallelism": 1}


def check_password_hash(conf: object) -> dict[str, int]:
    """The `password_hash` setting, checked: a cost below the least is refused, naming the
    key and the least, rather than weakening every stored password."""
    if not isinstance(conf, dict) or set(conf) != set(PASSWORD_HASH_DEFAULTS):
        raise ValueError(f"password_hash takes exactly the keys "
                         f"{', '.join(PASSWORD_HASH_DEFAULTS)}, not {conf!r}")
    for key, least in PASSWORD_HASH_LEAST.items():
        value = conf[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"password_hash.{key} must be a whole number of at least {least} "
                             f"(OWASP's least for argon2id), not {value!r}")
    return {key: int(conf[key]) for key in PASSWORD_HASH_DEFAULTS}


def _make_hasher(conf: dict[str, int]) -> tuple[PasswordHasher, str]:
    hasher = PasswordHasher(time_cost=conf["time_cost"], memory_cost=conf["memory_kib"],
                            parallelism=conf["parallelism"])
    # A real hash of a random password: failed logins for unknown users cost the same time
    # as wrong passwords, so timing does not reveal which names exist.
    return hasher, hasher.hash(secrets.token_hex(16))


_hasher, _DUMMY_HASH = _make_hasher(PASSWORD_HASH_DEFAULTS)


def use_password_hash(conf: object) -> None:
    """Hash and verify with the cost of the `password_hash` setting from now on (the
    process has one: nanod calls it as it opens the store)."""
    global _hasher, _DUMMY_HASH
    cost = check_password_hash(conf)
    if (cost["time_cost"], cost["memory_kib"], cost["parallelism"]) != (
            _hasher.time_cost, _hasher.memory_cost, _hasher.parallelism):
        _hasher, _DUMMY_HASH = _make_hasher(cost)


def format_time(value: dt.datetime | None) -> str:
    return value.strftime(TIME_FORMAT) if value else ""


def check_name(what: str, name: str) -> None:
    if not NAME_RULE.match(name or ""):
        raise Invalid(
            f"invalid {what} name {name!r}: use 1-64 letters, digits, '-', '_' or '.'"
        )


def check_password(password: str, field_name: str = "password") -> None:
    problems = []
    if len(password) < 8:
        problems.append("at least 8 characters")
    if not re.search(r"\d", password):
        problems.append("a digit")
    if not re.search(r"[a-z]", password):
        problems.append("a lower-case letter")
    if not re.search(r"[A-Z]", password):
        problems.append("an upper-case letter")
    if problems:
        raise Invalid(f"{field_name} is too weak: it needs " + ", ".join(problems))


def check_menu(menu: list[str]) -> list[str]:
    unknown = [tag for tag in menu if tag not in MENU_TAGS]
    if unknown:
        raise Invalid(
            f"unknown menu tag(s) {', '.join(unknown)}: choose from {', '.join(MENU_TAGS)}"
        )
    return list(dict.fromkeys(menu))


def check_grant(grantor: Collection[str], tags: Iterable[str], what: str) -> None:
    """Refuse (403, naming them) the menu tags in `tags` that `grantor` (the menu of the
    acting session) does not hold: nobody gives, or takes away, more than they have. Every
    road to a menu goes through here: a role's menu, a group's roles, a user's group."""
    wanted = set(tags)
    lacking = [tag for tag in MENU_TAGS if tag in wanted and tag not in grantor]
    if lacking:
        raise Forbidden(
            f"{what} menu tag(s) {', '.join(lacking)} that your roles do not hold: you may "
            "grant or take away only tags you hold yourself; ask an administrator who holds "
            "them"
        )


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LogLine(NamedTuple):
    """An entry to append to the log (`add_logs`): what happened, who, from where, on what,
    and the X-Request-Id of the API request that did it (api/request_ids.py)."""

    content: str
    user: str = ""
    address: str = ""
    resource: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class SessionInfo:
    """What a request knows about its caller once the session header is checked."""

    token: str
    handle: str
    user: str
    group: str
    menu: tuple[str, ...]
    address: str
    timeout: int
    expires: float
    visibility: dict[str, bool] = field(default_factory=dict)

    def allows(self, tag: str) -> bool:
        return tag in self.menu


class IdentityStore:
    """Mixin of `state.store.Store`: identity and access."""

    session_timeout: int = 180
    _init_lock = threading.Lock()

    # -- system ------------------------------------------------------------------------

    def system_ready(self) -> bool:
        return User.select().exists()

    def init_system(
        self,
        user: str,
        password: str,
        *,
        menu: list[str] | None = None,
        group: str = "admin",
        display: str = "",
        role: str = "super",
    ) -> None:
        """Create role, group and the first user; refused (403) once any user exists: from
        then on only sessions grant menus."""
        check_name("user", user)
        check_name("group", group)
        check_name("role", role)
        check_password(password)
        menu = check_menu(list(MENU_TAGS) if not menu else menu)
        password_hash = hash_password(password)
        # The lock closes the window between "no user yet" and the insert for concurrent
        # first-run requests (PostgreSQL's READ COMMITTED would let two through).
        with self._init_lock, db.atomic():
            if User.select().exists():
                raise Forbidden(ALREADY_INITIALIZED)
            Role.get_or_create(name=role, defaults={"menu": menu})
            Role.update(menu=menu).where(Role.name == role).execute()
            grp, _ = UserGroup.get_or_create(name=group, defaults={"display": display or group})
            GroupRole.get_or_create(group=grp, role=role)
            User.create(name=user, password_hash=password_hash, group=grp)

    # -- sessions ------------------------------------------------------------------------

    def authenticate(self, user: str, password: str) -> str:
        """Verify a password; returns the user's group. Slow on purpose (argon2): call it
        from a worker thread. One message for unknown users and wrong passwords alike."""
        row = User.get_or_none(User.name == user)
        ok = verify_password(row.password_hash if row else _DUMMY_HASH, password)
        if not row or not ok:
            raise Unauthorized("invalid user name or password")
        if row.group_id is None:
            raise Forbidden(f"user {user} belongs to no group: an administrator must add it to one")
        if _hasher.check_needs_rehash(row.password_hash):
            User.update(password_hash=hash_password(password)).where(User.name == user).execute()
        return row.group_id

    def open_session(self, user: str, address: str, timeout: int | None = None) -> SessionInfo:
        timeout = int(timeout or self.session_timeout)
        row = User.get_by_id(user)
        token = secrets.token_hex(16)  # 128 random bits
        handle = secrets.token_hex(8)  # the public id in GET /sessions/; unique
        expires = time.time() + timeout
        self.purge_sessions()  # logins are rare enough to keep the table small this way
        Session.create(
            token_hash=token_digest(token),
            handle=handle,
            user=user,
            group=row.group_id or "",
            address=address,
            timeout=timeout,
            expires=expires,
        )
        info = self._session_info(token, handle, user, row.group_id or "", address, timeout,
                                  expires)
        self._session_cache[token] = (time.monotonic(), info)  # its first request: no read
        return info

    # Authenticated reads are the hot path (the portal polls every second): a session is
    # read from the database at most once per SESSION_CACHE_SECONDS per process. Changes to
    # a user's roles or group therefore reach its live sessions within that time; removals
    # (user deleted, member removed, session ended) clear the cache at once.
    SESSION_CACHE_SECONDS = 1.0
    _session_cache: dict[str, tuple[float, SessionInfo]] = {}

    def forget_cached_sessions(self) -> None:
        self._session_cache.clear()

    def cached_session(self, token: str) -> SessionInfo | None:
        """The live session for `token` if this process read it within
        SESSION_CACHE_SECONDS, else None (then `session` asks the database). Memory only:
        safe on the IOLoop."""
        hit = self._session_cache.get(token)
        if hit is None or time.monotonic() - hit[0] >= self.SESSION_CACHE_SECONDS:
            return None
        return hit[1] if hit[1].expires >= time.time() else None

    def session(self, token: str) -> SessionInfo | None:
        """The live session for a bearer token, or None if unknown or expired. A SHA-256
        lookup, no password hashing: one indexed query (session, user, group and the
        group's roles, one row per role), cached for SESSION_CACHE_SECONDS."""
        if not token:
            return None
        info = self.cached_session(token)
        if info is not None:
            return info
        info = self._read_session(token)
        if info is None:
            self._session_cache.pop(token, None)
        else:
            if len(self._session_cache) > 10000:
                self._session_cache.clear()
            self._session_cache[token] = (time.monotonic(), info)
        return info

    def _read_session(self, token: str) -> SessionInfo | None:
        rows = _SESSION_QUERY.execute(token_digest(token))
        if not rows:
            return None
        handle, user, address, timeout, expires, group, *flags, _ = rows[0]
        if float(expires) < time.time():
            return None
        tags = {tag for row in rows if row[-1] for tag in json.loads(row[-1])}
        menu = tuple(tag for tag in MENU_TAGS if tag in tags)
        visibility = dict(zip(VISIBILITY_FLAGS, map(bool, flags), strict=True)) if group else {}
        return SessionInfo(token, handle, user, group or "", menu, address, int(timeout),
                           float(expires), visibility)

    def _menu(self, group: str | None) -> tuple[str, ...]:
        """The union of the menus of a group's roles, in MENU_TAGS order."""
        if not group:
            return ()
        roles = Role.select(Role.menu).join(GroupRole).where(GroupRole.group == group)
        tags = {tag for role in roles for tag in role.menu}
        return tuple(tag for tag in MENU_TAGS if tag in tags)

    def _session_info(
        self, token: str, handle: str, user: str, group: str, address: str, timeout: int,
        expires: float,
    ) -> SessionInfo:
        visibility: dict[str, bool] = {}
        if group:
            grp = UserGroup.get_or_none(UserGroup.name == group)
            if grp is not None:
                visibility = _visibility(grp)
        return SessionInfo(token, handle, user, group, self._menu(group), address, timeout,
                           expires, visibility)

    def extend_session(self, token: str) -> SessionInfo:
        info = self.session(token)
        if info is None:
            raise Unauthorized("session expired or unknown: log in again")
        expires = time.time() + info.timeout
        Session.update(expires=expires).where(Session.token_hash == token_digest(token)).execute()
        self._session_cache.pop(token, None)
        return info

    def list_sessions(self) -> list[dict]:
        rows = Session.select().where(Session.expires >= time.time()).order_by(Session.created_at)
        return [
            {
                "id": row.handle,
                "user": row.user_id,
                "address": row.address,
                "expire": format_time(dt.datetime.fromtimestamp(row.expires).replace(microsecond=0)),
            }
            for row in rows
        ]

    def purge_sessions(self) -> int:
        return Session.delete().where(Session.expires < time.time()).execute()

    # -- roles -----------------------------------------------------------------------------

    def list_roles(self) -> list[str]:
        return [name for (name,) in _ROLE_NAMES.execute()]

    def role(self, name: str) -> dict:
        row = Role.get_or_none(Role.name == name)
        if row is None:
            raise NotFound(f"no role named {name!r}")
        return {"menu": list(row.menu)}

    def create_role(self, name: str, menu: list[str], *, grantor: Collection[str]) -> None:
        """A new role; `grantor` (the caller's menu) must hold every tag of `menu`."""
        self.forget_cached_sessions()  # menus and flags reach live sessions now
        check_name("role", name)
        menu = check_menu(menu)
        check_grant(grantor, menu, f"role {name!r} would grant")
        with db.atomic():
            if Role.get_or_none(Role.name == name):
                raise Conflict(f"role {name!r} already exists: choose another name or modify it")
            Role.create(name=name, menu=menu)

    def modify_role(self, name: str, menu: list[str], *, grantor: Collection[str]) -> None:
        """Replace a role's menu; `grantor` must hold every tag the role gains or loses
        (the members of its groups hold the ones it loses today)."""
        self.forget_cached_sessions()  # menus and flags reach live sessions now
        menu = check_menu(menu)
        with db.atomic():
            row = Role.get_or_none(Role.name == name)
            if row is None:
                raise NotFound(f"no role named {name!r}")
            check_grant(grantor, set(menu) - set(row.menu), f"role {name!r} would gain")
            check_grant(grantor, set(row.menu) - set(menu), f"role {name!r} would lose")
            Role.update(menu=menu).where(Role.name == name).execute()

    def delete_role(self, name: str) -> None:
        self.forget_cached_sessions()  # menus and flags reach live sessions now
        with db.atomic():
            if Role.get_or_none(Role.name == name) is None:
                raise NotFound(f"no role named {name!r}")
            groups = [g.group_id for g in GroupRole.select().where(GroupRole.role == name)]
            if groups:
                raise Conflict(
                    f"role {name!r} is bound to group(s) {', '.join(sorted(groups))}: "
                    "remove it from them first"
                )
            Role.delete_by_id(name)

    # -- groups ----------------------------------------------------------------------------

    def list_groups(self) -> list[dict]:
        counts = dict(
            User.select(User.group, peewee.fn.COUNT(User.name))
            .where(User.group.is_null(False))
            .group_by(User.group)
            .tuples()
        )
        return [
            {"name": g.name, "display": g.display, "member": counts.get(g.name, 0)}
            for g in UserGroup.select().order_by(UserGroup.name)
        ]

    def group(self, name: str) -> dict:
        grp = self._group(name)
        roles = [link.role_id for link in grp.role_links.order_by(GroupRole.role)]
        members = [u.name for u in grp.members.order_by(User.name)]
        return {"name": grp.name, "display": grp.display, "role": roles, "member": members}

    def _group(self, name: str) -> UserGroup:
        grp = UserGroup.get_or_none(UserGroup.name == name)
        if grp is None:
            raise NotFound(f"no user group named {name!r}")
        return grp

    def _check_roles(self, roles: list[str]) -> list[str]:
        roles = list(dict.fromkeys(roles))
        known = {r.name for r in Role.select().where(Role.name.in_(roles))} if roles else set()
        missing = [r for r in roles if r not in known]
        if missing:
            raise NotFound(f"no role named {', '.join(missing)}: create it first")
        return roles

    @staticmethod
    def _roles_menu(roles: Iterable[str]) -> set[str]:
        """The union of the menus of `roles` (names of existing roles)."""
        names = list(roles)
        if not names:
            return set()
        return {tag for role in Role.select(Role.menu).where(Role.name.in_(names))
                for tag in role.menu}

    def _group_menu(self, grp: UserGroup) -> set[str]:
        return self._roles_menu(link.role_id for link in grp.role_links)

    def create_group(self, name: str, display: str, roles: list[str], *,
                     grantor: Collection[str]) -> None:
        """A new group bound to `roles`; `grantor` must hold every tag they give."""
        self.forget_cached_sessions()  # menus and flags reach live sessions now
        check_name("group", name)
        with db.atomic():
            roles = self._check_roles(roles)
            check_grant(grantor, self._roles_menu(roles),
                        f"user group {name!r} with role(s) {', '.join(roles)} would grant")
            if UserGroup.get_or_none(UserGroup.name == name):
                raise Conflict(f"user group {name!r} already exists")
            grp = UserGroup.create(name=name, display=display)
            for role in roles:
                GroupRole.create(group=grp, role=role)

    def modify_group(self, name: str, display: str | None, roles: list[str] | None, *,
                     grantor: Collection[str]) -> None:
        """Change a group's display name and/or its roles; `grantor` must hold every tag
        the group gains, and every tag it loses (its members hold them today)."""
        self.forget_cached_sessions()  # menus and flags reach live sessions now
        with db.atomic():
            grp = self._group(name)
            if roles is not None:
                roles = self._check_roles(roles)
                before, after = self._group_menu(grp), self._roles_menu(roles)
                check_grant(grantor, after - before, f"user group {name!r} would gain")
                check_grant(grantor, before - after, f"user group {name!r} would lose")
            if display is not None:
                grp.display = display
                grp.save()
            if roles is not None:
                GroupRole.delete().where(GroupRole.group == grp).execute()
                for role in roles:
                    GroupRole.create(group=grp, role=role)

    def delete_group(self, name: str) -> None:
        self.forget_cached_sessions()  # menus and flags reach live sessions now
        with db.atomic():
            grp = self._group(name)
            members = [u.name for u in grp.members]
            if members:
                raise Conflict(
                    f"user group {name!r} still has member(s) {', '.join(sorted(members))}: "
                    "remove them first"
                )
            GroupRole.delete().where(GroupRole.group == grp).execute()
            grp.delete_instance()

    def group_members(self, name: str) -> list[str]:
        return self.group(name)["member"]

    def add_member(self, group: str, user: str, *, grantor: Collection[str]) -> None:
        """Put a user without a group into `group`; `grantor` must hold every tag of the
        group's menu (the user gains them all)."""
        self.forget_cached_sessions()  # menus and flags reach live sessions now
        with db.atomic():
            grp = self._group(group)
            row = self._user(user)
            check_grant(grantor, self._group_menu(grp),
                        f"putting {user!r} into user group {group!r} would grant")
            if row.group_id == grp.name:
                raise Conflict(f"user {user!r} is already a member of {group!r}")
            if row.group_id:
                raise Conflict(
                    f"user {user!r} already belongs to group {row.group_id!r}: a user has one "
                    "group; remove it from there first"
                )
            row.group = grp
            row.save()

    def remove_member(self, group: str, user: str, *, grantor: Collection[str]) -> None:
        """Take a user out of its group (its sessions end); `grantor` must hold every tag
        the user loses."""
        self.forget_cached_sessions()  # menus and flags reach live sessions now
        with db.atomic():
            grp = self._group(group)
            row = self._user(user)
            if row.group_id != group:
                raise NotFound(f"user {user!r} is not a member of {group!r}")
            check_grant(grantor, self._group_menu(grp),
                        f"taking {user!r} out of user group {group!r} would take away")
            row.group = None
            row.save()
            Session.delete().where(Session.user == user).execute()
            self.forget_cached_sessions()

    # -- users -----------------------------------------------------------------------------

    def _user(self, name: str) -> User:
        row = User.get_or_none(User.name == name)
        if row is None:
            raise NotFound(f"no user named {name!r}")
        return row

    def list_users(self, group: str | None = None) -> list[str]:
        query = User.select(User.name).order_by(User.name)
        if group:
            self._group(group)
            query = query.where(User.group == group)
        return [u.name for u in query]

    def user(self, name: str) -> dict:
        row = self._user(name)
        return {"nick": row.nick, "mail": row.mail, "group": row.group_id or ""}

    def create_user(self, name: str, password: str, nick: str = "", mail: str = "") -> None:
        check_name("user", name)
        check_password(password)
        password_hash = hash_password(password)
        with db.atomic():
            if User.get_or_none(User.name == name):
                raise Conflict(f"user {name!r} already exists")
            User.create(name=name, nick=nick, mail=mail, password_hash=password_hash)

    def modify_user(self, name: str, nick: str | None, mail: str | None) -> None:
        row = self._user(name)
        if nick is not None:
            row.nick = nick
        if mail is not None:
            row.mail = mail
        row.modified_at = now()
        row.save()

    def delete_user(self, name: str, *, acting_user: str, grantor: Collection[str]) -> None:
        """Remove a user and its sessions; `grantor` must hold every tag the user holds
        (else a weaker administrator could remove a stronger one and take its name)."""
        if name == acting_user:
            raise Conflict("you cannot delete the user you are logged in as")
        with db.atomic():
            row = self._user(name)
            if row.group_id:
                check_grant(grantor, self._group_menu(row.group),
                            f"deleting user {name!r} would take away")
            Session.delete().where(Session.user == name).execute()
            self.forget_cached_sessions()
            User.delete_by_id(name)

    def change_password(self, name: str, old: str, new: str, *, keep_token: str = "") -> None:
        """Verify `old` and set `new` (call from a worker thread: argon2 is slow)."""
        row = self._user(name)
        if not verify_password(row.password_hash, old):
            # 403, not 401: the caller's session is fine (401 makes clients log out)
            raise Forbidden("the old password is wrong: give the current password as 'old'")
        check_password(new, "new password")
        User.update(password_hash=hash_password(new), modified_at=now()).where(
            User.name == name
        ).execute()
        # a new password ends the user's other sessions (someone may have had the old one)
        query = Session.delete().where(Session.user == name)
        if keep_token:
            query = query.where(Session.token_hash != token_digest(keep_token))
        query.execute()
        self.forget_cached_sessions()

    # -- visibility ------------------------------------------------------------------------

    def visibility(self, group: str) -> dict[str, bool]:
        return _visibility(self._group(group))

    def set_visibility(self, group: str, flags: dict[str, bool]) -> None:
        self.forget_cached_sessions()  # menus and flags reach live sessions now
        unknown = sorted(set(flags) - set(VISIBILITY_FLAGS))
        if unknown:
            raise Invalid(f"unknown visibility flag(s) {', '.join(unknown)}: "
                          f"choose from {', '.join(VISIBILITY_FLAGS)}")
        grp = self._group(group)
        # The portal sends only the flags that are true: a missing flag means false.
        for flag in VISIBILITY_FLAGS:
            setattr(grp, flag, bool(flags.get(flag, False)))
        grp.save()

    # -- logs ------------------------------------------------------------------------------

    _log_lock = threading.Lock()
    _last_log_id = ""  # the newest id this store gave out (set per instance)

    def add_log(self, content: str, *, user: str = "", address: str = "", resource: str = "",
                request_id: str = "") -> str:
        """Append an entry; returns its id (see `add_logs`)."""
        return self.add_logs([LogLine(content, user, address, resource, request_id)])[0]

    def add_logs(self, lines: list[LogLine]) -> list[str]:
        """Append entries in one transaction, in order; ids are YYYYMMDDHHMMSS + a 3-digit
        counter within that second.

        An id is never given out twice by this store: the counter goes on from the newest
        id it gave out as well as from the newest one stored, because the newest entries
        of a second may have been deleted (DELETE /logs/) and the next entry must not
        take their ids (a client would see the deleted id listed again)."""
        ids = []
        with self._log_lock, db.atomic():
            for line in lines:
                stamp = now()
                while True:
                    prefix = stamp.strftime("%Y%m%d%H%M%S")
                    last = (
                        LogEntry.select(LogEntry.id)
                        .where(LogEntry.id.startswith(prefix))
                        .order_by(LogEntry.id.desc())
                        .first()
                    )
                    highest = max(last.id if last else "", self._last_log_id
                                  if self._last_log_id.startswith(prefix) else "")
                    counter = int(highest[14:]) + 1 if highest else 0
                    if counter <= 999:
                        break
                    stamp += dt.timedelta(seconds=1)  # a full second: borrow the next one
                entry_id = f"{prefix}{counter:03d}"
                LogEntry.create(id=entry_id, time=stamp, content=line.content, user=line.user,
                                address=line.address, resource=line.resource,
                                request_id=line.request_id)
                self._last_log_id = entry_id
                ids.append(entry_id)
        return ids

    def query_logs(
        self,
        *,
        limit: int = 20,
        start: int = 0,
        after: dt.datetime | None = None,
        before: dt.datetime | None = None,
    ) -> dict:
        if after is None and before is None:
            after = now() - dt.timedelta(hours=24)
        query = LogEntry.select()
        if after is not None:
            query = query.where(LogEntry.time >= after)
        if before is not None:
            query = query.where(LogEntry.time <= before)
        total = query.count()
        rows = query.order_by(LogEntry.id.desc()).offset(start).limit(limit)
        # id, time and content are the contract; who, from where, on which resource and
        # by which request (X-Request-Id) ride along for clients that want them (the
        # portal ignores extra fields).
        return {
            "logs": [
                {"id": r.id, "time": format_time(r.time), "content": r.content,
                 "user": r.user, "address": r.address, "resource": r.resource,
                 "request_id": r.request_id}
                for r in rows
            ],
            "total": total,
        }

    def delete_logs(self, entries: list[str]) -> int:
        if not entries:
            return 0
        return LogEntry.delete().where(LogEntry.id.in_(entries)).execute()


def _visibility(grp: UserGroup) -> dict[str, bool]:
    return {flag: bool(getattr(grp, flag)) for flag in VISIBILITY_FLAGS}


class _HotQuery:
    """A query run on (nearly) every request, its SQL built once per kind of database.

    peewee's query builder costs more than SQLite needs to run these one-row lookups; the
    SQL text depends only on the dialect, so it is built on first use and then executed
    with fresh parameters (in the order the builder put them)."""

    def __init__(self, build: Callable[[], peewee.Query]) -> None:
        self._build = build
        self._sql: dict[type, str] = {}

    def execute(self, *params: object) -> list[tuple]:
        database = db.obj
        sql = self._sql.get(type(database))
        if sql is None:
            sql = self._sql[type(database)] = self._build().sql()[0]
        return database.execute_sql(sql, params).fetchall()


_SESSION_QUERY = _HotQuery(lambda: (
    Session.select(
        Session.handle, Session.user, Session.address, Session.timeout, Session.expires,
        User.group, *(getattr(UserGroup, flag) for flag in VISIBILITY_FLAGS), Role.menu,
    )
    .join(User)
    .join(UserGroup, peewee.JOIN.LEFT_OUTER)
    .join(GroupRole, peewee.JOIN.LEFT_OUTER)
    .join(Role, peewee.JOIN.LEFT_OUTER)
    .where(Session.token_hash == "")
))
_ROLE_NAMES = _HotQuery(lambda: Role.select(Role.name).order_by(Role.name))
