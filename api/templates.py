"""Routes of the seed's "System Templates": list, read, create, modify, delete.

Reading templates needs only a session (the create-guest dialog lists them); changing them
needs the 'templates' menu tag. Guests copy a template's values when they are created
(state/templates.py), so modifying or deleting a template never touches existing guests.
"""

from __future__ import annotations

from api.base import NanoHandler, Resource, contract


class TemplatesHandler(NanoHandler):
    menu = "templates"
    creates = True

    @contract(data="template_list")
    def get(self) -> None:
        self.reply(self.store.list_templates())

    @contract(data="created_id", body="template")
    def post(self) -> None:
        spec = self.body()
        template_id = self.store.create_template(spec)
        self.audit(f"created system template {spec['name']} ({template_id})")
        self.reply({"id": template_id})


class TemplateHandler(NanoHandler):
    menu = "templates"
    resource = Resource("template")

    @contract(data="template_info")
    def get(self, template_id: str) -> None:
        self.reply(self.store.template(template_id))

    @contract(data="nothing", body="template")
    def put(self, template_id: str) -> None:
        name = self.store.modify_template(template_id, self.body())
        self.audit(f"modified system template {name} ({template_id})")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, template_id: str) -> None:
        self.body()
        name = self.store.delete_template(template_id)
        self.audit(f"deleted system template {name} ({template_id})")
        self.reply()


ROUTES = [
    (r"/templates", TemplatesHandler),
    (r"/templates/([^/]+)", TemplateHandler),
]
