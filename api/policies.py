"""Routes of the seed's security policies: security policy groups with their ordered rules
('policies' menu tag to change), their search, and each guest's own security policy
('instance' menu tag to change; the guest must be visible to the caller, else 404).

The store (`state/policies.py`) validates rules and decides visibility. A guest policy change
enqueues the firewall of the guest's cell (Key('firewall', cell)) and the guest; policy
groups are templates copied into guests, so changing one enqueues nothing.
"""

from __future__ import annotations

from api.base import NanoHandler, Resource, contract, query_bool
from reconciler.contract import Key
from state.errors import Invalid


def _index(raw: str) -> int:
    if not raw.isdigit():
        raise Invalid(f"rule index {raw!r} in the path must be a whole number from 0")
    return int(raw)


# -- security policy groups ------------------------------------------------------------------


class PolicyGroupsHandler(NanoHandler):
    menu = "policies"
    creates = True

    @contract(data="policy_group_list", extension=True)
    def get(self) -> None:  # not in the seed: the same as an unfiltered search
        self.reply(self.store.search_security_policy_groups(self.session))

    @contract(data="created_id", body="security_policy_group_create")
    def post(self) -> None:
        spec = self.body()
        group_id = self.store.create_security_policy_group(spec, self.session)
        self.audit(f"created security policy group {spec['name']} ({group_id})")
        self.reply({"id": group_id})


class PolicyGroupHandler(NanoHandler):
    menu = "policies"
    resource = Resource("security_policy_group")

    @contract(data="policy_group")
    def get(self, group_id: str) -> None:
        self.reply(self.store.security_policy_group(group_id, self.session))

    @contract(data="nothing", body="security_policy_group_modify")
    def put(self, group_id: str) -> None:
        spec = self.body()
        self.store.modify_security_policy_group(group_id, spec, self.session)
        self.audit(f"modified security policy group {group_id}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, group_id: str) -> None:
        self.body()
        name = self.store.security_policy_group(group_id, self.session)["name"]
        self.store.delete_security_policy_group(group_id, self.session)
        self.audit(f"deleted security policy group {name} ({group_id})")
        self.reply()


class PolicyGroupRulesHandler(NanoHandler):
    menu = "policies"
    creates = True
    resource = Resource("security_policy_group")

    @contract(data="policy_rule_list")
    def get(self, group_id: str) -> None:
        self.reply(self.store.security_policy_rules(group_id, self.session))

    @contract(data="nothing", body="security_policy_rule")
    def post(self, group_id: str) -> None:
        rule = self.body()
        self.store.add_security_policy_rule(group_id, rule, self.session)
        self.audit(f"added a rule to security policy group {group_id}")
        self.reply()


class PolicyGroupRuleHandler(NanoHandler):
    menu = "policies"
    resource = Resource("security_policy_group")

    @contract(data="nothing", body="security_policy_rule")
    def put(self, group_id: str, index: str) -> None:
        rule = self.body()
        self.store.modify_security_policy_rule(group_id, _index(index), rule, self.session)
        self.audit(f"modified rule {index} of security policy group {group_id}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, group_id: str, index: str) -> None:
        self.body()
        self.store.remove_security_policy_rule(group_id, _index(index), self.session)
        self.audit(f"removed rule {index} of security policy group {group_id}")
        self.reply()


class PolicyGroupRuleOrderHandler(NanoHandler):
    menu = "policies"
    resource = Resource("security_policy_group")

    @contract(data="nothing", body="security_policy_rule_order")
    def put(self, group_id: str, index: str) -> None:
        direction = self.body()["direction"]
        self.store.move_security_policy_rule(group_id, _index(index), direction, self.session)
        self.audit(f"moved rule {index} of security policy group {group_id} {direction}")
        self.reply()


class PolicyGroupSearchHandler(NanoHandler):
    @contract(data="policy_group_list", query=("enabled_only", "global_only", "owner", "group"))
    def get(self) -> None:
        self.reply(self.store.search_security_policy_groups(
            self.session,
            enabled_only=bool(query_bool(self, "enabled_only")),
            global_only=bool(query_bool(self, "global_only")),
            owner=self.get_query_argument("owner", None) or None,
            group=self.get_query_argument("group", None) or None,
        ))


# -- a guest's security policy ----------------------------------------------------------------


class GuestPolicyBase(NanoHandler):
    menu = "instance"

    def visible_guest(self, guest_id: str) -> dict[str, str]:
        """The guest, when the caller may see it (404 otherwise)."""
        return self.store.security_policy_guest(guest_id, self.session)

    def changed(self, guest: dict[str, str], what: str) -> None:
        if guest["cell"]:
            self.ctx.enqueue(Key("firewall", guest["cell"]))
        self.ctx.enqueue(Key("guest", guest["id"]))
        self.audit(f"{what} in the security policy of guest {guest['id']}")
        self.reply()


class GuestPolicyHandler(GuestPolicyBase):
    resource = Resource("guest_security_policy")

    @contract(data="guest_policy")
    def get(self, guest_id: str) -> None:
        self.visible_guest(guest_id)
        self.reply(self.store.guest_policy(guest_id))


class GuestDefaultActionHandler(GuestPolicyBase):
    resource = Resource("guest_security_policy")

    @contract(data="nothing", body="security_policy_default_action")
    def put(self, guest_id: str) -> None:
        guest = self.visible_guest(guest_id)
        action = self.body()["action"]
        self.store.set_guest_default_action(guest_id, action)
        self.changed(guest, f"set the default action to {action}")


class GuestRulesHandler(GuestPolicyBase):
    creates = True

    @contract(data="nothing", body="security_policy_rule")
    def post(self, guest_id: str) -> None:
        guest = self.visible_guest(guest_id)
        self.store.append_guest_rule(guest_id, self.body())
        self.changed(guest, "appended a rule")


class GuestRuleHandler(GuestPolicyBase):
    resource = Resource("guest_security_policy")

    @contract(data="nothing", body="security_policy_rule")
    def put(self, guest_id: str, index: str) -> None:
        guest = self.visible_guest(guest_id)
        self.store.modify_guest_rule(guest_id, _index(index), self.body())
        self.changed(guest, f"modified rule {index}")

    @contract(data="nothing", body="no_fields")
    def delete(self, guest_id: str, index: str) -> None:
        guest = self.visible_guest(guest_id)
        self.body()
        self.store.remove_guest_rule(guest_id, _index(index))
        self.changed(guest, f"removed rule {index}")


class GuestRuleOrderHandler(GuestPolicyBase):
    resource = Resource("guest_security_policy")

    @contract(data="nothing", body="security_policy_rule_order")
    def put(self, guest_id: str, index: str) -> None:
        guest = self.visible_guest(guest_id)
        direction = self.body()["direction"]
        self.store.move_guest_rule(guest_id, _index(index), direction)
        self.changed(guest, f"moved rule {index} {direction}")


ROUTES = [
    (r"/security_policy_groups", PolicyGroupsHandler),
    (r"/security_policy_groups/([^/]+)", PolicyGroupHandler),
    (r"/security_policy_groups/([^/]+)/rules", PolicyGroupRulesHandler),
    (r"/security_policy_groups/([^/]+)/rules/([^/]+)", PolicyGroupRuleHandler),
    (r"/security_policy_groups/([^/]+)/rules/([^/]+)/order", PolicyGroupRuleOrderHandler),
    (r"/search/security_policy_groups", PolicyGroupSearchHandler),
    (r"/guests/([^/]+)/security_policy", GuestPolicyHandler),
    (r"/guests/([^/]+)/security_policy/default_action", GuestDefaultActionHandler),
    (r"/guests/([^/]+)/security_policy/rules", GuestRulesHandler),
    (r"/guests/([^/]+)/security_policy/rules/([^/]+)", GuestRuleHandler),
    (r"/guests/([^/]+)/security_policy/rules/([^/]+)/order", GuestRuleOrderHandler),
]
