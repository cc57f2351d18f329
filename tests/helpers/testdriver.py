"""Simulated cells for tests: libvirt test-driver node files (ARCHITECTURE.md §5).

`write_test_cell(path, cpus=..., memory_kib=..., domains=N)` writes a `<node>` file that
libvirt's test driver loads for `test:///<path>`: a host with that many CPUs and that much
memory, and N `<domain type='test'>` entries (running unless told otherwise) carrying our
ownership mark when `owned`. Each open of a file URI is a private hypervisor, so one file
per simulated cell gives independent cells in one process.

Used by driver tests, multi-cell tests and scale benchmarks.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from reconciler.drivers.libvirt_hv import render_owner_metadata
from reconciler.naming import names

_TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
_RUNSTATE_SHUTOFF = 5  # virDomainState VIR_DOMAIN_SHUTOFF, for <test:runstate>
_IDS = uuid.UUID("6f1c1d1e-8a59-4a4c-9d0e-6e616e6f7465")  # namespace of generated ids


@dataclass(frozen=True)
class TestDomain:
    __test__ = False  # not a pytest test class

    name: str
    uuid: str
    owned_id: str | None  # our guest id in the mark, None when not owned
    vcpus: int
    memory_kib: int
    running: bool


@dataclass(frozen=True)
class TestCell:
    """A written node file: open it with `uri`."""

    __test__ = False

    path: Path
    uri: str
    cpus: int
    memory_kib: int
    domains: tuple[TestDomain, ...]


def write_test_cell(
    path: str | os.PathLike[str],
    *,
    cpus: int,
    memory_kib: int,
    domains: int = 0,
    owned: bool = True,
    name_prefix: str = "d",
    running: bool = True,
    domain_vcpus: int = 1,
    domain_memory_kib: int = 131072,
    default_network: bool = True,
) -> TestCell:
    """Write a test-driver node file at `path` and describe what it holds.

    Unowned domains are named `{name_prefix}{i}`, owned ones as nanod names a guest's
    domain (`<names prefix>-<guest id>`, reconciler/naming.py); their uuids and guest ids
    are derived from the file path and `{name_prefix}{i}`, so they are stable across runs
    and distinct between cells. An owned domain's guest id is its uuid (as Nano's guest
    ids are)."""
    target = Path(path).resolve()
    listed: list[TestDomain] = []
    parts = [
        "<node>",
        # nodeinfo CPUs = nodes * sockets * cores * threads
        f"  <cpu><mhz>2400</mhz><model>x86_64</model><active>{cpus}</active>"
        f"<nodes>1</nodes><sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>",
        f"  <memory>{memory_kib}</memory>",
    ]
    for index in range(domains):
        name = f"{name_prefix}{index}"
        dom_uuid = str(uuid.uuid5(_IDS, f"{target}#{name}"))
        owned_id = dom_uuid if owned else None
        if owned_id:
            name = names().domain(owned_id)
        listed.append(
            TestDomain(name, dom_uuid, owned_id, domain_vcpus, domain_memory_kib, running)
        )
        metadata = f"<metadata>{render_owner_metadata(owned_id)}</metadata>" if owned_id else ""
        runstate = "" if running else f"<test:runstate>{_RUNSTATE_SHUTOFF}</test:runstate>"
        parts.append(
            f"  <domain type='test' xmlns:test={quoteattr(_TEST_NS)}>"
            f"<name>{escape(name)}</name><uuid>{dom_uuid}</uuid>{metadata}"
            f"<memory unit='KiB'>{domain_memory_kib}</memory><vcpu>{domain_vcpus}</vcpu>"
            f"<os><type>hvm</type></os>{runstate}</domain>"
        )
    # libvirt's NAT network `default`, as a freshly installed host has it (guests of pools
    # without an address pool attach to it); `default_network=False`: a host without it
    if default_network:
        parts.append(
            "  <network><name>default</name><uuid>"
            f"{uuid.uuid5(_IDS, f'{target}#network-default')}</uuid>"
            "<forward mode='nat'/><bridge name='virbr0'/>"
            "<ip address='192.168.122.1' netmask='255.255.255.0'/></network>"
        )
    parts.append("</node>\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(parts))
    return TestCell(
        path=target,
        uri=f"test://{target}",
        cpus=cpus,
        memory_kib=memory_kib,
        domains=tuple(listed),
    )
