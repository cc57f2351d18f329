"""Host facts of a cell in one shell round trip, parsed by pure functions.

`gather_facts(shell, storage_paths)` runs one fixed `sh` script on the cell (storage paths
and a per-call marker token are its positional arguments, never part of the script) and
parses the marked sections of its output into a frozen `HostFacts`: logical CPUs, memory,
disk space per storage path, bridges, kernel, libvirtd/QEMU/nft versions and cumulative
disk/network byte counters. `speeds(prev, cur, seconds)` turns two counter samples into
bytes per second.

Callers: the cell reconciler (capacity, versions, bridges for external networks) and the
statistics sampler (speeds). Parsers are tested against real output captured in
tests/fixtures/facts/.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from state.errors import Permanent

from .shell import RC_NOT_FOUND, HostShell, check

SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's size

# The whole script is fixed text: $1 is the marker token, the rest are storage paths.
# Each section is "@@<token> NAME\n<output, stderr merged>\n@@<token>/rc RC\n".
GATHER_SCRIPT = r"""
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"; LC_ALL=C; export PATH LC_ALL
t=$1; shift
run() { n=$1; shift; printf '@@%s %s\n' "$t" "$n"; "$@" 2>&1; printf '\n@@%s/rc %s\n' "$t" "$?"; }
devices() { for d in "$1"/*; do [ -e "$d/device" ] && echo "${d##*/}"; done; return 0; }
qdiscs() {
  r=$(uname -r)
  if [ -r /proc/config.gz ]; then gzip -dc /proc/config.gz
  elif [ -r "/boot/config-$r" ]; then cat "/boot/config-$r"
  else echo "no kernel config"; fi | grep -E '^(# )?CONFIG_NET_SCH_SFQ[= ]|^no kernel config'
  [ -d /sys/module/sch_sfq ] && echo "loaded sch_sfq"
  ls "/lib/modules/$r/kernel/net/sched/" 2>/dev/null | grep '^sch_sfq' | sed 's/^/module /'
  return 0
}
run nproc nproc
run meminfo cat /proc/meminfo
run kernel uname -r
run bridges ip -j link show type bridge
run libvirtd libvirtd --version
run qemu qemu-system-x86_64 --version
run nft nft --version
run diskstats cat /proc/diskstats
run disks devices /sys/block
run netdev cat /proc/net/dev
run nics devices /sys/class/net
run qdiscs qdiscs
i=0
for p in "$@"; do run "df$i" df -B1 --output=target,size,avail -- "$p"; i=$((i+1)); done
"""


@dataclass(frozen=True)
class Section:
    """One command's output (stdout and stderr merged) and exit code."""

    text: str
    rc: int


@dataclass(frozen=True)
class Version:
    """A tool's version; `version` is None when the tool is missing or failed, and
    `reason` then says why (e.g. "nft: not installed")."""

    tool: str
    version: str | None
    reason: str | None = None


@dataclass(frozen=True)
class DiskSpace:
    """Space of the filesystem holding a storage path (bytes); None with `error` when
    the path could not be measured (missing path, df failure)."""

    path: str
    mount: str | None
    total_bytes: int | None
    free_bytes: int | None
    error: str | None = None


@dataclass(frozen=True)
class Counters:
    """Cumulative bytes since boot: read/written by whole physical disks, received/sent
    by physical NICs (loopback and virtual interfaces excluded, see `parse_netdev`)."""

    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0


@dataclass(frozen=True)
class Speeds:
    """Bytes per second between two `Counters` samples; never negative."""

    disk_read: float = 0.0
    disk_write: float = 0.0
    net_rx: float = 0.0
    net_tx: float = 0.0


@dataclass(frozen=True)
class HostFacts:
    """What `gather_facts` learned about a cell; `warnings` lists parts that failed but
    did not prevent the rest (bridges, counters)."""

    cpus: int
    memory_total_bytes: int
    memory_available_bytes: int
    disks: tuple[DiskSpace, ...]
    bridges: tuple[str, ...]
    kernel: str
    libvirtd: Version
    qemu: Version
    nft: Version
    counters: Counters
    warnings: tuple[str, ...] = ()
    sfq: bool | None = None  # the sfq qdisc libvirt needs for NIC bandwidth; None = unknown
    sfq_detail: str = ""     # what decided it, for messages


# -- parsers (pure) --------------------------------------------------------------------


def split_sections(output: str, token: str) -> dict[str, Section]:
    """Cut `GATHER_SCRIPT` output into sections by name. Text outside markers is ignored;
    a section whose rc line is missing (output cut short) is left out."""
    begin, end = f"@@{token} ", f"@@{token}/rc "
    sections: dict[str, Section] = {}
    name: str | None = None
    body: list[str] = []
    for line in output.split("\n"):
        if line.startswith(begin):
            name, body = line[len(begin) :], []
        elif line.startswith(end) and name is not None:
            text = "\n".join(body)
            # run() prints a newline before the rc marker in case output lacked one
            text = text[:-1] if text.endswith("\n") else text
            rc_text = line[len(end) :].strip()
            sections[name] = Section(text, int(rc_text) if rc_text.isdigit() else -1)
            name = None
        elif name is not None:
            body.append(line)
    return sections


def parse_nproc(text: str) -> int:
    value = text.strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"nproc printed {value!r}")
    return int(value)


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo. Kernels before 3.14 have no
    MemAvailable: MemFree + Buffers + Cached stands in for it."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            scale = 1024 if len(words) > 1 and words[1] == "kB" else 1
            values[key.strip()] = int(words[0]) * scale
    if "MemTotal" not in values:
        raise ValueError("no MemTotal in /proc/meminfo")
    available = values.get("MemAvailable")
    if available is None:
        available = sum(values.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return values["MemTotal"], available


def parse_df(text: str, path: str) -> DiskSpace:
    """`df -B1 --output=target,size,avail PATH`: a header then one line; the mount
    target may contain spaces, so the two numbers are taken from the right."""
    lines = [line for line in text.splitlines() if line.strip()]
    for line in lines[1:]:
        parts = line.rsplit(None, 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            return DiskSpace(path, parts[0].strip(), int(parts[1]), int(parts[2]))
    reason = " ".join(lines).strip() or "no output"
    return DiskSpace(path, None, None, None, error=f"df {path}: {reason}")


def parse_bridges(text: str) -> tuple[str, ...]:
    """Bridge names from `ip -j link show type bridge` (JSON list of links), sorted."""
    links = json.loads(text) if text.strip() else []
    return tuple(sorted(str(link["ifname"]) for link in links if "ifname" in link))


_VERSION = re.compile(r"\d+\.\d+(?:\.\d+)*")


def parse_version(text: str) -> str | None:
    """The first dotted number on the first line: "libvirtd (libvirt) 9.0.0",
    "QEMU emulator version 7.2.22 (Debian ...)", "nftables v1.0.6 (Lester Gooch #5)"."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    match = _VERSION.search(first)
    return match.group(0) if match else None


def version_from(tool: str, section: Section | None) -> Version:
    """A `Version` from a `--version` section; a missing or failing tool gives None and
    the reason."""
    if section is None:
        return Version(tool, None, f"{tool}: no output")
    if section.rc == RC_NOT_FOUND:
        return Version(tool, None, f"{tool}: not installed")
    version = parse_version(section.text) if section.rc == 0 else None
    if version is None:
        detail = section.text.strip().splitlines()[-1:] or ["no output"]
        return Version(tool, None, f"{tool} --version failed (exit {section.rc}): {detail[0]}")
    return Version(tool, version)


_VIRTUAL_DISK = re.compile(r"^(loop|ram|zram|dm-|md|sr|fd|nbd|rbd|drbd)")


def _whole_disks(names: Iterable[str]) -> set[str]:
    """Without /sys/block: drop virtual devices and partitions (sda1, nvme0n1p1, vda2:
    another listed name plus digits, optionally after 'p')."""
    candidates = {name for name in names if not _VIRTUAL_DISK.match(name)}
    partitions = {
        name
        for name in candidates
        for disk in candidates
        if name != disk and re.fullmatch(re.escape(disk) + r"p?\d+", name)
    }
    return candidates - partitions


def parse_diskstats(text: str, disks: Iterable[str] | None = None) -> tuple[int, int]:
    """(read, written) bytes of whole physical disks from /proc/diskstats.

    `disks` names the whole physical disks (/sys/block entries with a device link): that
    excludes partitions, loop/ram/zram, and device-mapper/md layers whose I/O would be
    counted twice. Without it a name-based guess does the same."""
    rows: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        fields = line.split()
        # major minor name reads merged sectors_read ms writes merged sectors_written ...
        if len(fields) >= 10 and fields[5].isdigit() and fields[9].isdigit():
            rows[fields[2]] = (int(fields[5]), int(fields[9]))
    wanted = set(disks) if disks is not None else _whole_disks(rows)
    read = sum(rows[name][0] for name in wanted if name in rows)
    written = sum(rows[name][1] for name in wanted if name in rows)
    return read * SECTOR_BYTES, written * SECTOR_BYTES


def parse_netdev(text: str, nics: Iterable[str] | None = None) -> tuple[int, int]:
    """(received, sent) bytes from /proc/net/dev, loopback excluded.

    `nics` names the physical NICs (/sys/class/net entries with a device link); when
    given and present, only they count: bridges, taps and veths carry the same guest
    traffic again. Without it (or none present) every interface but `lo` counts."""
    rows: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 9 or not fields[0].isdigit() or not fields[8].isdigit():
            continue
        rows[name.strip()] = (int(fields[0]), int(fields[8]))
    counted = set(rows) - {"lo"}
    wanted = {name for name in (nics or ()) if name in counted} or counted
    return sum(rows[n][0] for n in wanted), sum(rows[n][1] for n in wanted)


def _names(section: Section | None) -> list[str] | None:
    if section is None or section.rc != 0:
        return None
    return [line.strip() for line in section.text.splitlines() if line.strip()]


def parse_counters(sections: Mapping[str, Section], warnings: list[str]) -> Counters:
    """`Counters` from the diskstats/disks/netdev/nics sections; failures become
    warnings and zero counters (speeds then read 0, not garbage)."""
    disk_read = disk_write = net_rx = net_tx = 0
    diskstats, netdev = sections.get("diskstats"), sections.get("netdev")
    if diskstats is not None and diskstats.rc == 0:
        disk_read, disk_write = parse_diskstats(diskstats.text, _names(sections.get("disks")))
    else:
        warnings.append("disk counters unavailable: /proc/diskstats unreadable")
    if netdev is not None and netdev.rc == 0:
        net_rx, net_tx = parse_netdev(netdev.text, _names(sections.get("nics")))
    else:
        warnings.append("network counters unavailable: /proc/net/dev unreadable")
    return Counters(disk_read, disk_write, net_rx, net_tx)


def parse_sfq(section: Section | None) -> tuple[bool | None, str]:
    """Whether the kernel has the sfq qdisc (libvirt's NIC bandwidth limits need it): built
    in, or a module that is loaded or installed. None when the kernel's config cannot be
    read. Returns (answer, what decided it)."""
    if section is None:
        return None, "no qdisc section in the host facts"
    lines = [line.strip() for line in section.text.splitlines() if line.strip()]
    if "loaded sch_sfq" in lines or any(line.startswith("module sch_sfq") for line in lines):
        return True, "sch_sfq module present"
    if "CONFIG_NET_SCH_SFQ=y" in lines:
        return True, "CONFIG_NET_SCH_SFQ=y"
    if "CONFIG_NET_SCH_SFQ=m" in lines:
        return False, "CONFIG_NET_SCH_SFQ=m but no sch_sfq module is installed"
    if "# CONFIG_NET_SCH_SFQ is not set" in lines:
        return False, "its kernel has no sfq qdisc (CONFIG_NET_SCH_SFQ is not set)"
    return None, "the kernel's config is not readable"


def parse_facts(output: str, token: str, storage_paths: Sequence[str]) -> HostFacts:
    """`HostFacts` from the whole output of `GATHER_SCRIPT`. Raises `Permanent` when the
    essentials (CPUs, memory, kernel) are missing; other failures become None values,
    per-path errors or warnings."""
    sections = split_sections(output, token)

    def essential(name: str) -> Section:
        section = sections.get(name)
        if section is None or section.rc != 0:
            detail = section.text.strip()[-500:] if section else "missing from the output"
            raise Permanent(f"host facts: {name} failed: {detail}")
        return section

    warnings: list[str] = []
    try:
        cpus = parse_nproc(essential("nproc").text)
        memory_total, memory_available = parse_meminfo(essential("meminfo").text)
    except ValueError as exc:
        raise Permanent(f"host facts: {exc}") from exc
    kernel = essential("kernel").text.strip()

    bridges: tuple[str, ...] = ()
    section = sections.get("bridges")
    if section is not None and section.rc == 0:
        try:
            bridges = parse_bridges(section.text)
        except (ValueError, TypeError, KeyError) as exc:
            warnings.append(f"bridges unreadable: {exc}")
    else:
        detail = section.text.strip()[-200:] if section else "no output"
        warnings.append(f"bridges unavailable: {detail}")

    disks = []
    for index, path in enumerate(storage_paths):
        section = sections.get(f"df{index}")
        if section is None:
            disks.append(DiskSpace(path, None, None, None, error=f"df {path}: no output"))
        else:
            disks.append(parse_df(section.text, path))

    sfq, sfq_detail = parse_sfq(sections.get("qdiscs"))
    return HostFacts(
        cpus=cpus,
        memory_total_bytes=memory_total,
        memory_available_bytes=memory_available,
        disks=tuple(disks),
        bridges=bridges,
        kernel=kernel,
        libvirtd=version_from("libvirtd", sections.get("libvirtd")),
        qemu=version_from("qemu-system-x86_64", sections.get("qemu")),
        nft=version_from("nft", sections.get("nft")),
        counters=parse_counters(sections, warnings),
        warnings=tuple(warnings),
        sfq=sfq,
        sfq_detail=sfq_detail,
    )


def speeds(prev: Counters, cur: Counters, seconds: float) -> Speeds:
    """Bytes per second from `prev` to `cur` taken `seconds` apart. A counter that went
    down (host rebooted, device removed) or a non-positive interval gives 0."""
    if seconds <= 0:
        return Speeds()

    def rate(before: int, after: int) -> float:
        return (after - before) / seconds if after >= before else 0.0

    return Speeds(
        disk_read=rate(prev.disk_read_bytes, cur.disk_read_bytes),
        disk_write=rate(prev.disk_write_bytes, cur.disk_write_bytes),
        net_rx=rate(prev.net_rx_bytes, cur.net_rx_bytes),
        net_tx=rate(prev.net_tx_bytes, cur.net_tx_bytes),
    )


# -- effects ---------------------------------------------------------------------------


def gather_argv(token: str, storage_paths: Sequence[str]) -> list[str]:
    """The one command `gather_facts` runs (exposed for capturing fixtures)."""
    return ["sh", "-c", GATHER_SCRIPT, "sh", token, *storage_paths]


def gather_facts(
    shell: HostShell, storage_paths: Sequence[str] = (), *, timeout: float = 30
) -> HostFacts:
    """Facts of the host behind `shell` in one command. Raises `Unavailable` when the host
    cannot be reached, `Permanent` when the script fails outright or the essentials are
    missing."""
    token = secrets.token_hex(8)  # output cannot forge a marker it does not know
    result = shell.run(gather_argv(token, list(storage_paths)), timeout=timeout)
    if f"@@{token} " not in result.stdout:
        check(result, "host facts script")
        raise Permanent(f"host facts script printed no sections: {result.stdout[-500:]!r}")
    return parse_facts(result.stdout, token, list(storage_paths))
