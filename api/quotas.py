"""Extension routes of user group quotas (state/quotas.py):

    GET    /user_groups/{name}/quota   {group, limits, usage}: the group's members, or 'user'
    PUT    /user_groups/{name}/quota   change the limits given (body `quota`): 'user'
    DELETE /user_groups/{name}/quota   remove the quota (every limit unlimited): 'user'

A limit of 0 is unlimited. The seed's GET /user_groups/{name} keeps its shape; the usage of a
group is shown here. Registered in api/app.py; the quota check itself runs in the store,
inside each create's and resize's transaction.
"""

from __future__ import annotations

from api.base import NanoHandler, contract
from state.errors import Forbidden


class QuotaHandler(NanoHandler):
    menu = "user"  # changing a quota is an administrator's work

    @classmethod
    def tag_for(cls, method: str) -> str | None:
        # reading needs no tag: `get` lets members of the group and 'user' holders in
        return None if method in ("GET", "HEAD") else super().tag_for(method)

    @contract(data="group_quota", extension=True)
    def get(self, name: str) -> None:
        assert self.session is not None  # prepare() refuses requests without a session
        if self.session.group != name and not self.session.allows("user"):
            raise Forbidden(f"the quota of user group {name!r} is shown to its members and "
                            "to holders of the 'user' menu tag only")
        self.reply(self.store.quota(name))

    @contract(data="group_quota", body="quota", extension=True)
    def put(self, name: str) -> None:
        values = self.body()
        data = self.store.set_quota(name, values)
        shown = ", ".join(f"{k} {v}" for k, v in sorted(values.items())) or "nothing"
        self.audit(f"set the quota of user group {name}: {shown}")
        self.reply(data)

    @contract(data="nothing", body="no_fields", extension=True)
    def delete(self, name: str) -> None:
        self.body()  # an empty or JSON body; nothing in it is used
        self.store.delete_quota(name)
        self.audit(f"removed the quota of user group {name}")
        self.reply()


ROUTES = [
    (r"/user_groups/([^/]+)/quota", QuotaHandler),
]
