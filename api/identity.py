"""Routes of the seed's "FrontEnd Management" group plus the omitted ones: system init,
sessions, roles, user groups and members, users, passwords, user search, resource
visibility and logs; plus the extension `GET /session_details/` (live sessions with user,
address and expiry). Semantics: ../shared/api/COMPATIBILITY.md, "Identity and access".
"""

from __future__ import annotations

import datetime as dt

from api.base import NanoHandler, contract, query_int, sleep
from api.setup_token import SetupToken
from state.errors import Forbidden, Invalid, NanoError, NotFound
from state.identity import ALREADY_INITIALIZED, TIME_FORMAT


class SystemHandler(NanoHandler):
    """GET: readiness and limits. POST: the first administrator, only while no user exists
    (403 after), and only from this host or with the setup token (api/setup_token.py)."""

    public = True

    @contract(data="system_status", extension=True)
    def get(self) -> None:
        limits = self.store.limits
        self.reply({
            "ready": self.store.system_ready(),
            "max_cores": limits["max_cores"],
            "max_memory": limits["max_memory"],
            "max_disk": limits["max_disk"],
        })

    @contract(data="nothing", body="system_init", extension=True)
    async def post(self) -> None:
        setup: SetupToken = self.ctx.extras["setup_token"]
        if await self.stored(self.store.system_ready):
            setup.spend()  # e.g. `nanod init` ran while this nanod served
            raise Forbidden(ALREADY_INITIALIZED)
        setup.admit(self.request)
        spec = self.body()
        await self.hashing(
            lambda: self.store.init_system(
                spec["user"], spec["password"], menu=spec.get("menu"),
                group=spec.get("group") or "admin", display=spec.get("display", ""),
                role=spec.get("role") or "super",
            )
        )
        setup.spend()
        self.audit(f"initialized the system with administrator {spec['user']}")
        self.reply()


class SessionsHandler(NanoHandler):
    read_menu = "user"  # listing every live session is for administrators

    @classmethod
    def is_public(cls, method: str) -> bool:
        return method == "POST"  # the login itself needs no session

    @contract(data="session_created", body="login")
    async def post(self) -> None:
        spec = self.body()
        user, address = spec["user"], self.address
        keys = (f"user:{user}", f"addr:{address}")
        wait = self.ctx.throttle.delay(*keys)
        # Counted as failed until it succeeds: attempts sent in parallel see each other
        # and wait longer and longer, instead of all passing before any has failed.
        self.ctx.throttle.failed(*keys)
        await sleep(wait)
        try:
            await self.hashing(self.store.authenticate, user, spec["password"])
        except NanoError as exc:
            self.ctx.metrics.login_failed()
            self.ctx.audit.add(f"failed login for {user!r} from {address}: {exc.message}",
                               user=user, address=address, resource="/sessions/",
                               request_id=self.request_id)
            raise
        self.ctx.throttle.succeeded(*keys)
        info = await self.stored(self.store.open_session, user, address)
        self.audit(f"logged in from {address}")
        self._login_user = user
        self.reply({
            "session": info.token,
            "group": info.group,
            "timeout": info.timeout,
            "menu": list(info.menu),
            "address": address,
        })

    @contract(data="names", extension=True)
    def get(self) -> None:
        # As the original: the ids of the live sessions, as strings. Ours are public
        # handles, never the bearer tokens; GET /session_details/ gives who and from where.
        self.reply([item["id"] for item in self.store.list_sessions()])

    @property
    def user(self) -> str:
        return getattr(self, "_login_user", "") or super().user


class SessionDetailsHandler(NanoHandler):
    """Extension: the live sessions with their user, address and expiry (GET /sessions/
    keeps the original's shape, a list of ids)."""

    read_menu = "user"

    @contract(data="session_details", extension=True)
    def get(self) -> None:
        self.reply(self.store.list_sessions())


class SessionHandler(NanoHandler):
    def log_path(self) -> str:
        return "/api/v1/sessions/***"  # the path carries a bearer token

    @contract(data="nothing", body="no_fields")
    def put(self, token: str) -> None:
        self.body()  # JSON or nothing; nothing in it is used
        own = token == self.session.token
        if not own and not self.session.allows("user"):
            raise Forbidden("you may keep alive only your own session")
        if not own and self.store.session(token) is None:
            raise NotFound("no such live session")
        self.store.extend_session(token)
        self.quiet()  # keep-alives every minute would flood the log
        self.reply()

    @contract(data="session_info")
    def get(self, token: str) -> None:
        info = self.store.session(token)
        if info is None or (info.token != self.session.token and not self.session.allows("user")):
            raise NotFound("no such live session")
        self.reply({
            "user": info.user,
            "group": info.group,
            "address": info.address,
            "menu": list(info.menu),
            "timeout": info.timeout,
            "resource": [],
        })


class RolesHandler(NanoHandler):
    menu = "user"

    @contract(data="names")
    def get(self) -> None:
        self.reply(self.store.list_roles())


class RoleHandler(NanoHandler):
    menu = "user"
    creates = True

    @contract(data="role_info")
    def get(self, name: str) -> None:
        self.reply(self.store.role(name))

    @contract(data="nothing", body="role")
    def post(self, name: str) -> None:
        self.store.create_role(name, self.body()["menu"], grantor=self.session.menu)
        self.audit(f"created role {name}")
        self.reply()

    @contract(data="nothing", body="role")
    def put(self, name: str) -> None:
        self.store.modify_role(name, self.body()["menu"], grantor=self.session.menu)
        self.audit(f"modified role {name}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, name: str) -> None:
        self.body()  # JSON or nothing; nothing in it is used
        self.store.delete_role(name)
        self.audit(f"removed role {name}")
        self.reply()


class GroupsHandler(NanoHandler):
    menu = "user"

    @contract(data="user_group_list")
    def get(self) -> None:
        self.reply(self.store.list_groups())


class GroupHandler(NanoHandler):
    menu = "user"
    creates = True

    @contract(data="user_group_detail")
    def get(self, name: str) -> None:
        self.reply(self.store.group(name))

    @contract(data="nothing", body="user_group")
    def post(self, name: str) -> None:
        spec = self.body()
        self.store.create_group(name, spec["display"], spec.get("role", []),
                                grantor=self.session.menu)
        self.audit(f"created user group {name}")
        self.reply()

    @contract(data="nothing", body="user_group_modify")
    def put(self, name: str) -> None:
        spec = self.body()
        self.store.modify_group(name, spec.get("display"), spec.get("role"),
                                grantor=self.session.menu)
        self.audit(f"modified user group {name}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, name: str) -> None:
        self.body()  # JSON or nothing; nothing in it is used
        self.store.delete_group(name)
        self.audit(f"removed user group {name}")
        self.reply()


class MembersHandler(NanoHandler):
    menu = "user"

    @contract(data="names")
    def get(self, group: str) -> None:
        self.reply(self.store.group_members(group))


class MemberHandler(NanoHandler):
    menu = "user"
    creates = True

    @contract(data="nothing", body="no_fields")
    def post(self, group: str, user: str) -> None:
        self.body()  # JSON or nothing; nothing in it is used
        self.store.add_member(group, user, grantor=self.session.menu)
        self.audit(f"added {user} to user group {group}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, group: str, user: str) -> None:
        self.body()  # JSON or nothing; nothing in it is used
        self.store.remove_member(group, user, grantor=self.session.menu)
        self.audit(f"removed {user} from user group {group}")
        self.reply()


class UsersHandler(NanoHandler):
    menu = "user"

    @contract(data="names")
    def get(self) -> None:
        self.reply(self.store.list_users())


class UserHandler(NanoHandler):
    menu = "user"
    creates = True

    def required_menu(self) -> str | None:
        # Everyone may read and edit their own profile; other users need the 'user' tag.
        own = self.path_args and self.path_args[0] == self.user
        if own and self.request.method in ("GET", "PUT"):
            return None
        return super().required_menu()

    @contract(data="user_info")
    def get(self, name: str) -> None:
        data = self.store.user(name)
        self.reply({"nick": data["nick"], "mail": data["mail"]})

    @contract(data="nothing", body="user_create")
    async def post(self, name: str) -> None:
        spec = self.body()
        await self.hashing(
            lambda: self.store.create_user(name, spec["password"], spec.get("nick", ""),
                                           spec.get("mail", ""))
        )
        self.audit(f"created user {name}")
        self.reply()

    @contract(data="nothing", body="user_modify")
    def put(self, name: str) -> None:
        spec = self.body()
        self.store.modify_user(name, spec.get("nick"), spec.get("mail"))
        self.audit(f"modified user {name}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, name: str) -> None:
        self.body()  # JSON or nothing; nothing in it is used
        self.store.delete_user(name, acting_user=self.user, grantor=self.session.menu)
        self.audit(f"deleted user {name}")
        self.reply()


class PasswordHandler(NanoHandler):
    @contract(data="nothing", body="password_change")
    async def put(self, name: str) -> None:
        if name != self.user and not self.session.allows("user"):
            raise Forbidden("you may change only your own password")
        spec = self.body()
        # A wrong old password is a guess like a failed login: slowed down the same way.
        keys = (f"user:{name}", f"addr:{self.address}")
        wait = self.ctx.throttle.delay(*keys)
        self.ctx.throttle.failed(*keys)  # until it succeeds, as for a login
        await sleep(wait)
        await self.hashing(lambda: self.store.change_password(
            name, spec["old"], spec["new"], keep_token=self.session.token))
        self.ctx.throttle.succeeded(*keys)
        self.audit(f"changed the password of {name}")
        self.reply()


class UserSearchHandler(NanoHandler):
    @contract(data="names", query=("group",))
    def get(self) -> None:
        self.reply(self.store.list_users(self.get_query_argument("group", None)))


class VisibilityHandler(NanoHandler):
    menu = "visibility"

    def _group(self) -> str:
        if not self.session.group:
            raise Invalid("your user belongs to no group")
        return self.session.group

    @contract(data="visibility_info")
    def get(self) -> None:
        self.reply(self.store.visibility(self._group()))

    @contract(data="nothing", body="visibility")
    def put(self) -> None:
        flags = self.body()
        self.store.set_visibility(self._group(), flags)
        shown = ", ".join(k for k, v in sorted(flags.items()) if v) or "nothing"
        self.audit(f"set visibility of group {self._group()} to {shown}")
        self.reply()


def _query_time(handler: NanoHandler, name: str) -> dt.datetime | None:
    raw = handler.get_query_argument(name, None)
    if not raw:
        return None
    for fmt in (TIME_FORMAT, "%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"):
        try:
            return dt.datetime.strptime(raw, fmt)
        except ValueError:
            continue
    raise Invalid(f"query parameter {name}: {raw!r} is not a time like '2026-01-31 08:00:00'")


class LogsHandler(NanoHandler):
    menu = "log"
    read_menu = "log"  # the audit log tells who did what to which resource: not for all
    creates = True

    @classmethod
    def tag_for(cls, method: str) -> str | None:
        # the portal posts an entry after most actions, for every user: any session may
        # add one (it is recorded as theirs); reading and deleting need 'log'
        if method == "POST":
            return None
        return super().tag_for(method)

    @contract(data="log_page", query=("limit", "start", "after", "before"))
    def get(self) -> None:
        self.ctx.audit.flush()  # the entries of every change answered so far are listed
        self.reply(
            self.store.query_logs(
                limit=query_int(self, "limit", 20, minimum=1),
                start=query_int(self, "start", 0),
                after=_query_time(self, "after"),
                before=_query_time(self, "before"),
            )
        )

    @contract(data="nothing", body="log_add")
    def post(self) -> None:
        spec = self.body()
        self.store.add_log(spec["content"], user=self.user, address=self.address,
                           resource="client", request_id=self.request_id)
        self.quiet()  # the entry is the record: no second audit line
        self.reply()

    @contract(data="nothing", body="log_delete")
    def delete(self) -> None:
        entries = self.body()["entries"]
        removed = self.store.delete_logs(entries)
        self.audit(f"deleted {removed} log entries")
        self.reply()


ROUTES = [
    (r"/system", SystemHandler),
    (r"/sessions", SessionsHandler),
    (r"/sessions/([^/]+)", SessionHandler),
    (r"/session_details", SessionDetailsHandler),
    (r"/roles", RolesHandler),
    (r"/roles/([^/]+)", RoleHandler),
    (r"/user_groups", GroupsHandler),
    (r"/user_groups/([^/]+)", GroupHandler),
    (r"/user_groups/([^/]+)/members", MembersHandler),
    (r"/user_groups/([^/]+)/members/([^/]+)", MemberHandler),
    (r"/users", UsersHandler),
    (r"/users/([^/]+)", UserHandler),
    (r"/users/([^/]+)/password", PasswordHandler),
    (r"/user_search", UserSearchHandler),
    (r"/resource_visibilities", VisibilityHandler),
    (r"/logs", LogsHandler),
]
