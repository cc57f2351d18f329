"""System templates: the hardware profile a guest is created with (admin name, OS type,
disk bus, NIC model, display, remote control protocol, USB controller, tablet).

Called by the template routes (`api/templates.py`), by `nanod/server.py` at start
(`ensure_default_templates`) and by the guest store (`state/guests.py`), which COPIES a
template's values into the guest's spec at create time (`template_values`): changing or
deleting a template never changes an existing guest, so templates can be deleted freely.
"""

from __future__ import annotations

import uuid
from typing import Any

import peewee

from state.db import db
from state.errors import Conflict, Invalid, NotFound
from state.identity import format_time
from state.models import Template, now

TEMPLATE_FIELDS = ("admin", "operating_system", "disk", "network", "display", "control", "usb",
                   "tablet")
CHOICES: dict[str, tuple[str, ...]] = {
    "operating_system": ("linux", "windows"),
    "disk": ("scsi", "sata", "ide"),
    "network": ("virtio", "e1000", "rtl8139"),
    "display": ("vga", "cirrus", "qxl", "virtio", "none"),
    "control": ("vnc", "spice"),
    "usb": ("", "nec-xhci"),
    "tablet": ("", "usb", "virtio"),
}

BUILTIN_TEMPLATE: dict[str, str] = {
    "admin": "root", "operating_system": "linux", "disk": "scsi", "network": "virtio",
    "display": "vga", "control": "vnc", "usb": "", "tablet": "usb",
}
"""What `template: ""` on a guest create means (the portal sends it when the user picked no
system version): COMPATIBILITY.md's default, not a stored template."""


def _profile(admin: str, os: str, disk: str, network: str, display: str, usb: str,
             tablet: str) -> dict[str, str]:
    return {"admin": admin, "operating_system": os, "disk": disk, "network": network,
            "display": display, "control": "vnc", "usb": usb, "tablet": tablet}


DEFAULT_TEMPLATES: tuple[tuple[str, dict[str, str]], ...] = (
    ("CentOS 7", _profile("root", "linux", "scsi", "virtio", "vga", "nec-xhci", "usb")),
    ("CentOS 6", _profile("root", "linux", "sata", "virtio", "vga", "nec-xhci", "usb")),
    ("Windows Server 2012",
     _profile("Administrator", "windows", "sata", "e1000", "vga", "nec-xhci", "usb")),
    ("General", _profile("root", "linux", "sata", "rtl8139", "vga", "", "usb")),
    ("Legacy", _profile("root", "linux", "ide", "rtl8139", "cirrus", "", "")),
)
"""Created on first start (COMPATIBILITY.md "Resources")."""


def check_template(spec: dict[str, Any]) -> dict[str, str]:
    """The stored values of a template body (schema-checked already): every field present,
    `usb`/`tablet` "none" read as "" (the document's examples answer "none")."""
    out: dict[str, str] = {}
    problems = []
    for key in TEMPLATE_FIELDS:
        value = spec.get(key, BUILTIN_TEMPLATE[key] if key not in ("usb", "tablet") else "")
        if key in ("usb", "tablet") and value == "none":
            value = ""
        if key in CHOICES and value not in CHOICES[key]:
            problems.append(f"{key}: {value!r} is not one of "
                            f"{', '.join(repr(c) for c in CHOICES[key])}")
        out[key] = value
    if not out["admin"].strip():
        problems.append("admin: must not be empty (e.g. root or Administrator)")
    if problems:
        raise Invalid("invalid template: " + "; ".join(problems), details=problems)
    return out


def check_template_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 64:
        raise Invalid("name: a template name needs 1-64 characters, e.g. 'CentOS 7'")
    return name


def template_brief(row: Template) -> dict[str, Any]:
    return {"id": row.id, "name": row.name,
            "operating_system": (row.spec or {}).get("operating_system", "linux"),
            "created_time": format_time(row.created_at),
            "modified_time": format_time(row.modified_at)}


class TemplateStore:
    """Mixin of `state.store.Store`: system templates."""

    def _template(self, template_id: str) -> Template:
        row = Template.get_or_none(Template.id == template_id)
        if row is None:
            raise NotFound(f"no system template with id {template_id!r}: list them with "
                           "GET /templates/")
        return row

    def list_templates(self) -> list[dict[str, Any]]:
        return [template_brief(t) for t in Template.select().order_by(Template.name)]

    def template(self, template_id: str) -> dict[str, Any]:
        row = self._template(template_id)
        return {**template_brief(row), **{k: (row.spec or {}).get(k, "")
                                          for k in TEMPLATE_FIELDS}}

    def template_values(self, template_id: str) -> dict[str, str]:
        """What a new guest copies: the stored template's values, or the built-in default
        for "" (no stored template needed)."""
        if not template_id:
            return dict(BUILTIN_TEMPLATE)
        row = self._template(template_id)
        return {k: (row.spec or {}).get(k, BUILTIN_TEMPLATE[k]) for k in TEMPLATE_FIELDS}

    def _check_unique_template(self, name: str, but: str = "") -> None:
        if Template.select().where((Template.name == name) & (Template.id != but)).exists():
            raise Conflict(f"a system template named {name!r} already exists: choose another "
                           "name")

    def create_template(self, spec: dict[str, Any]) -> str:
        name = check_template_name(spec.get("name", ""))
        values = check_template(spec)
        template_id = str(uuid.uuid4())
        try:
            with db.atomic():
                self._check_unique_template(name)
                Template.create(id=template_id, name=name, spec=values)
        except peewee.IntegrityError:  # a concurrent create took the name
            self._check_unique_template(name)
            raise
        return template_id

    def modify_template(self, template_id: str, spec: dict[str, Any]) -> str:
        """Replace a template's values (the portal sends the whole template and leaves out
        usb/tablet when they are empty); returns its name. Guests keep their copy."""
        name = check_template_name(spec.get("name", ""))
        values = check_template(spec)
        with db.atomic():
            row = self._template(template_id)
            self._check_unique_template(name, but=template_id)
            Template.update(name=name, spec=values, modified_at=now(),
                            generation=Template.generation + 1).where(
                Template.id == row.id).execute()
        return name

    def delete_template(self, template_id: str) -> str:
        with db.atomic():
            row = self._template(template_id)
            row.delete_instance()
        return row.name

    def ensure_default_templates(self) -> int:
        """Create the default templates when no template exists (first start); returns how
        many were created. A store whose templates were all deleted gets them back at the
        next start, which is the one case where "once" is not remembered."""
        if Template.select().exists():
            return 0
        try:
            with db.atomic():
                for name, values in DEFAULT_TEMPLATES:
                    Template.create(id=str(uuid.uuid4()), name=name, spec=dict(values))
        except peewee.IntegrityError:  # another process created them at the same moment
            return 0
        return len(DEFAULT_TEMPLATES)
