"""The system templates of COMPATIBILITY.md ("Resources") and a few display variants, as
DomainSpec keyword arguments over its defaults (which are the default template): shared by
the domain XML unit tests and the libvirt round-trip tests."""

from __future__ import annotations

TEMPLATES: dict[str, dict[str, str]] = {
    "default": dict(
        os_type="linux",
        disk_bus="scsi",
        nic_model="virtio",
        display="vga",
        control="vnc",
        usb="",
        tablet="usb",
    ),
    "centos7": dict(disk_bus="scsi", usb="nec-xhci"),
    "centos6": dict(disk_bus="sata", usb="nec-xhci"),
    "windows2012": dict(os_type="windows", disk_bus="sata", nic_model="e1000", usb="nec-xhci"),
    "general": dict(disk_bus="sata", nic_model="rtl8139"),
    "legacy": dict(disk_bus="ide", nic_model="rtl8139", display="cirrus", tablet=""),
    "spice-qxl": dict(display="qxl", control="spice", tablet="virtio"),
    "virtio-gpu": dict(display="virtio"),
    "headless": dict(display="none", tablet=""),
}
