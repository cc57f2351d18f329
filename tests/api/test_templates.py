"""System templates through the API: the five defaults of a fresh system, the reply shapes
(TemplateBrief, TemplateStatus), create/modify/delete with unique names, the menu tag, and
that guests keep the copy they were created with."""

from __future__ import annotations

import pytest

from state.models import Guest
from tests.api.guest_helpers import create_guest, make_pool, user_session

CENTOS = {"name": "CentOS 8", "admin": "root", "operating_system": "linux", "disk": "scsi",
          "network": "virtio", "display": "vga", "control": "vnc", "usb": "nec-xhci",
          "tablet": "usb"}


@pytest.mark.gen_test
async def test_default_templates_exist_once(api, server):
    templates = await api.ok("GET", "/templates/")
    assert [t["name"] for t in templates] == ["CentOS 6", "CentOS 7", "General", "Legacy",
                                              "Windows Server 2012"]
    assert set(templates[0]) == {"id", "name", "operating_system", "created_time",
                                 "modified_time"}
    by_name = {t["name"]: await api.ok("GET", f"/templates/{t['id']}") for t in templates}
    assert by_name["Legacy"] == {**by_name["Legacy"], "disk": "ide", "network": "rtl8139",
                                 "display": "cirrus", "usb": "", "tablet": ""}
    assert by_name["Windows Server 2012"]["admin"] == "Administrator"
    assert by_name["Windows Server 2012"]["operating_system"] == "windows"
    assert by_name["CentOS 7"]["usb"] == "nec-xhci" and by_name["CentOS 6"]["disk"] == "sata"
    assert server.store.ensure_default_templates() == 0  # a second start adds nothing


@pytest.mark.gen_test
async def test_template_crud(api):
    created = await api.ok("POST", "/templates/", CENTOS)
    template_id = created["id"]
    data = await api.ok("GET", f"/templates/{template_id}")
    assert {k: data[k] for k in CENTOS} == CENTOS
    assert data["id"] == template_id and data["created_time"] and data["modified_time"]
    duplicate = await api.call("POST", "/templates/", {**CENTOS, "tablet": ""})
    assert duplicate.code == 409
    # the portal leaves out usb and tablet when they are empty: they become ""
    modified = {k: v for k, v in CENTOS.items() if k not in ("usb", "tablet")}
    await api.ok("PUT", f"/templates/{template_id}", {**modified, "name": "CentOS 8.1",
                                                      "display": "qxl"})
    data = await api.ok("GET", f"/templates/{template_id}")
    assert (data["name"], data["display"], data["usb"], data["tablet"]) == ("CentOS 8.1",
                                                                           "qxl", "", "")
    taken = await api.call("PUT", f"/templates/{template_id}", {**CENTOS, "name": "Legacy"})
    assert taken.code == 409
    bad = await api.call("POST", "/templates/", {"name": "x", "disk": "floppy"})
    assert bad.code == 400
    for field in ("disk:", "admin: is required", "network: is required"):
        assert field in bad.message
    await api.ok("DELETE", f"/templates/{template_id}")
    assert (await api.call("GET", f"/templates/{template_id}")).code == 404
    assert (await api.call("DELETE", f"/templates/{template_id}")).code == 404
    none_alias = await api.ok("POST", "/templates/", {**CENTOS, "name": "n", "usb": "none"})
    assert (await api.ok("GET", f"/templates/{none_alias['id']}"))["usb"] == ""


@pytest.mark.gen_test
async def test_templates_need_the_menu_tag_to_change(api):
    session = await user_session(api, "tom", menu=["instance"])
    assert len(await api.ok("GET", "/templates/", session=session)) == 5
    refused = await api.call("POST", "/templates/", CENTOS, session=session)
    assert refused.code == 403 and "templates" in refused.message


@pytest.mark.gen_test
async def test_guests_keep_their_copy(api):
    await make_pool(api)
    template_id = (await api.ok("POST", "/templates/", CENTOS))["id"]
    guest_id = await create_guest(api, template=template_id)
    await api.ok("PUT", f"/templates/{template_id}", {**CENTOS, "disk": "ide"})
    await api.ok("DELETE", f"/templates/{template_id}")
    assert Guest.get_by_id(guest_id).spec["template_spec"]["disk"] == "scsi"
