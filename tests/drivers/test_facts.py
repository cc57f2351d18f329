"""Host facts: parsers against real output captured on a Debian 12 cell
(tests/fixtures/facts/, see capture.py there), then `gather_facts` live through LocalShell
and through ParamikoShell over a real sshd."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from reconciler.drivers.facts import (
    Counters,
    DiskSpace,
    HostFacts,
    Section,
    Speeds,
    Version,
    gather_facts,
    parse_bridges,
    parse_diskstats,
    parse_facts,
    parse_meminfo,
    parse_netdev,
    parse_sfq,
    parse_version,
    speeds,
    split_sections,
    version_from,
)
from reconciler.drivers.shell import CommandResult, HostShell, LocalShell, ParamikoShell
from state.errors import Permanent
from tests.helpers.sshd import SshServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "facts"
TOKEN = "fixture"  # the marker token capture.py used
PATHS = ["/var/lib/libvirt/images", "/tmp", "/nonexistent/nano-pool"]


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def sections(name: str) -> dict[str, Section]:
    return split_sections(fixture(name), TOKEN)


# -- parsers on captured output --------------------------------------------------------


def test_whole_debian12_capture() -> None:
    facts = parse_facts(fixture("gather-debian12.txt"), TOKEN, PATHS)
    assert facts.cpus == 2
    assert facts.memory_total_bytes == 24684084 * 1024
    assert 0 < facts.memory_available_bytes <= facts.memory_total_bytes
    assert facts.kernel == "6.18.44-fc-v669"
    assert facts.bridges == ("nanofixbr0",)
    assert facts.libvirtd == Version("libvirtd", "9.0.0")
    assert facts.qemu == Version("qemu-system-x86_64", "7.2.22")
    assert facts.nft == Version("nft", "1.0.6")
    images, tmp, missing = facts.disks
    assert images == DiskSpace("/var/lib/libvirt/images", "/", 270553174016, 84913205248)
    assert tmp.mount == "/" and tmp.total_bytes == images.total_bytes
    assert missing.total_bytes is None and missing.free_bytes is None
    assert missing.error == (
        "df /nonexistent/nano-pool: df: /nonexistent/nano-pool: No such file or directory"
    )
    # vda only (loop*, zram0 skipped); eth0 only (lo, ifb*, the bridge skipped)
    assert facts.counters == Counters(
        disk_read_bytes=2873402 * 512,
        disk_write_bytes=2385936 * 512,
        net_rx_bytes=104941538,
        net_tx_bytes=169816,
    )
    assert facts.warnings == ()


def test_minimal_host_reports_missing_tools_with_reasons() -> None:
    """Same script on a host without /usr/sbin (no libvirtd, no nft): the rest still
    parses and each missing tool says why."""
    facts = parse_facts(fixture("gather-minimal.txt"), TOKEN, PATHS)
    assert facts.libvirtd == Version("libvirtd", None, "libvirtd: not installed")
    assert facts.nft == Version("nft", None, "nft: not installed")
    assert facts.qemu.version == "7.2.22"  # /usr/bin
    assert facts.cpus == 2 and facts.kernel == "6.18.44-fc-v669"
    assert facts.bridges == ()


def test_sections_keep_output_and_exit_codes() -> None:
    found = sections("gather-debian12.txt")
    assert set(found) == {
        "nproc", "meminfo", "kernel", "bridges", "libvirtd", "qemu", "nft",
        "diskstats", "disks", "netdev", "nics", "df0", "df1", "df2",
    }  # fmt: skip
    assert found["nproc"] == Section("2", 0)
    assert found["df2"].rc == 1
    # a marker with another token is just output: a command cannot forge a section
    forged = "@@other nproc\n999\n@@other/rc 0\n"
    assert split_sections(forged + fixture("gather-debian12.txt"), TOKEN)["nproc"].text == "2"
    # output cut short: the unfinished section is left out
    cut = fixture("gather-debian12.txt").split("@@fixture/rc 0\n@@fixture kernel")[0]
    assert set(split_sections(cut, TOKEN)) == {"nproc"}


def test_meminfo_without_memavailable_estimates_it() -> None:
    old_kernel = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n"
    assert parse_meminfo(old_kernel) == (1000 * 1024, 420 * 1024)
    with pytest.raises(ValueError):
        parse_meminfo("nothing here")


def test_bridges_json_capture() -> None:
    assert parse_bridges(fixture("bridges.json")) == ("nanofixbr0",)
    assert parse_bridges("[]\n") == ()


def test_versions_of_real_banners() -> None:
    found = sections("gather-debian12.txt")
    assert parse_version(found["libvirtd"].text) == "9.0.0"
    assert parse_version(found["qemu"].text) == "7.2.22"
    assert parse_version(found["nft"].text) == "1.0.6"
    failing = version_from("nft", Section("Error: something broke", 1))
    assert failing.version is None and "exit 1" in (failing.reason or "")


def test_diskstats_counts_whole_disks_once() -> None:
    capture = sections("gather-debian12.txt")["diskstats"].text
    assert parse_diskstats(capture, ["vda"]) == (2873402 * 512, 2385936 * 512)
    assert parse_diskstats(capture) == parse_diskstats(capture, ["vda"])  # name-based guess
    # a typical LVM host (fields: major minor name reads merged SECTORS_READ ms writes
    # merged SECTORS_WRITTEN ...): partitions, dm and md layers repeat the disks' I/O
    lvm_host = "\n".join(
        [
            "   8       0 sda 100 0 1000 0 50 0 2000 0 0 0 0",
            "   8       1 sda1 10 0 100 0 5 0 200 0 0 0 0",
            "   8       2 sda2 90 0 900 0 45 0 1800 0 0 0 0",
            " 259       0 nvme0n1 10 0 30 0 10 0 40 0 0 0 0",
            " 259       1 nvme0n1p1 10 0 30 0 10 0 40 0 0 0 0",
            " 253       0 dm-0 90 0 900 0 45 0 1800 0 0 0 0",
            "   9       0 md0 1 0 7 0 1 0 7 0 0 0 0",
            "   7       0 loop0 5 0 55 0 0 0 0 0 0 0 0",
        ]
    )
    assert parse_diskstats(lvm_host) == (1030 * 512, 2040 * 512)
    assert parse_diskstats(lvm_host, ["sda", "nvme0n1"]) == (1030 * 512, 2040 * 512)


def test_netdev_counts_physical_nics_or_all_but_lo() -> None:
    capture = sections("gather-debian12.txt")["netdev"].text
    assert parse_netdev(capture, ["eth0"]) == (104941538, 169816)
    assert parse_netdev(capture, None) == (104941538, 169816)  # others are idle here
    assert parse_netdev(capture, ["lo"]) == (104941538, 169816)  # lo never counts
    # a cell with guests: their traffic crosses vnet0 and virbr0 and eth0 (NAT)
    cell = "\n".join(
        [
            "    lo:  500 5 0 0 0 0 0 0  500 5 0 0 0 0 0 0",
            "  eth0: 9000 9 0 0 0 0 0 0 7000 7 0 0 0 0 0 0",
            "virbr0: 8000 8 0 0 0 0 0 0 6000 6 0 0 0 0 0 0",
            " vnet0: 6000 6 0 0 0 0 0 0 8000 8 0 0 0 0 0 0",
        ]
    )
    assert parse_netdev(cell, ["eth0"]) == (9000, 7000)
    assert parse_netdev(cell) == (23000, 21000)  # without the NIC list: counted thrice


def test_speeds_are_rates_and_never_negative() -> None:
    before = Counters(1000, 2000, 3000, 4000)
    after = Counters(3000, 2000, 9000, 4100)
    assert speeds(before, after, 2.0) == Speeds(1000.0, 0.0, 3000.0, 50.0)
    rebooted = Counters(10, 20, 30, 40)  # counters restarted from zero
    assert speeds(after, rebooted, 5.0) == Speeds(0.0, 0.0, 0.0, 0.0)
    assert speeds(before, after, 0) == Speeds()


class ScriptedShell:
    """Answers every run with one fixed result (the whole script's captured output)."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 30
    ) -> CommandResult:
        return self.result

    def close(self) -> None:
        pass


def test_a_failing_script_is_permanent() -> None:
    with pytest.raises(Permanent, match="exit 126.*Permission denied"):
        gather_facts(ScriptedShell(CommandResult(126, "", "sh: Permission denied")))
    with pytest.raises(Permanent, match="no sections"):
        gather_facts(ScriptedShell(CommandResult(0, "motd noise\n", "")))


# -- live ------------------------------------------------------------------------------


def assert_facts_of_this_machine(facts: HostFacts, storage: Path) -> None:
    assert facts.cpus == os.cpu_count()
    meminfo = Path("/proc/meminfo").read_text()
    assert facts.memory_total_bytes == parse_meminfo(meminfo)[0]
    assert facts.kernel == os.uname().release
    (disk,) = facts.disks
    stat = os.statvfs(storage)
    assert disk.path == str(storage) and disk.error is None
    assert disk.total_bytes == stat.f_blocks * stat.f_frsize
    assert disk.free_bytes is not None and disk.free_bytes > 0
    for tool in (facts.libvirtd, facts.qemu, facts.nft):
        assert tool.version or tool.reason  # a version, or why there is none


def test_gather_facts_locally(tmp_path: Path) -> None:
    facts = gather_facts(LocalShell(), [str(tmp_path)])
    assert_facts_of_this_machine(facts, tmp_path)
    again = gather_facts(LocalShell(), [str(tmp_path)])
    rates = speeds(facts.counters, again.counters, 1.0)
    assert min(rates.disk_read, rates.disk_write, rates.net_rx, rates.net_tx) >= 0


class RecordingShell:
    """Passes every command to `inner` and keeps the argv lists it was given."""

    def __init__(self, inner: HostShell) -> None:
        self.inner = inner
        self.commands: list[list[str]] = []

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 30
    ) -> CommandResult:
        self.commands.append(list(argv))
        return self.inner.run(argv, input=input, timeout=timeout)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.integration
def test_gather_facts_over_ssh_in_one_round_trip(sshd: SshServer, tmp_path: Path) -> None:
    sh = RecordingShell(
        ParamikoShell(
            sshd.host, sshd.port, sshd.user, key_file=sshd.key_file, known_hosts=sshd.known_hosts
        )
    )
    try:
        facts = gather_facts(sh, [str(tmp_path)])
    finally:
        sh.close()
    assert_facts_of_this_machine(facts, tmp_path)
    assert len(sh.commands) == 1
    assert sh.commands[0][:2] == ["sh", "-c"] and sh.commands[0][-1] == str(tmp_path)


def test_storage_paths_are_data_not_script(tmp_path: Path) -> None:
    # were the name run as shell text, df would be asked about ".../x INJECTED" and fail
    odd = tmp_path / """x $(echo INJECTED); it's "q" `true`"""
    odd.mkdir()
    (disk,) = gather_facts(LocalShell(), [str(odd)]).disks
    assert disk.path == str(odd) and disk.error is None and disk.total_bytes


@pytest.mark.parametrize(("text", "expect"), [
    # this CI machine's kernel (6.18, captured): no sfq, so libvirt cannot limit NIC speed
    ("# CONFIG_NET_SCH_SFQ is not set\n", (False, "its kernel has no sfq qdisc "
                                           "(CONFIG_NET_SCH_SFQ is not set)")),
    # Debian 12's kernel: a module, installed
    ("CONFIG_NET_SCH_SFQ=m\nmodule sch_sfq.ko\n", (True, "sch_sfq module present")),
    ("CONFIG_NET_SCH_SFQ=m\n", (False, "CONFIG_NET_SCH_SFQ=m but no sch_sfq module is "
                                       "installed")),
    ("CONFIG_NET_SCH_SFQ=y\n", (True, "CONFIG_NET_SCH_SFQ=y")),
    ("no kernel config\nloaded sch_sfq\n", (True, "sch_sfq module present")),
    ("no kernel config\n", (None, "the kernel's config is not readable")),
])
def test_sfq_qdisc_is_read_from_the_kernel_config(text, expect):
    assert parse_sfq(Section(text, 0)) == expect


def test_sfq_is_probed_on_this_host():
    """The real probe on this machine agrees with its kernel's config."""
    import gzip

    facts = gather_facts(LocalShell())
    config = Path("/proc/config.gz")
    if not config.exists():
        assert facts.sfq in (None, True), facts.sfq_detail
        return
    lines = gzip.decompress(config.read_bytes()).decode().splitlines()
    if "# CONFIG_NET_SCH_SFQ is not set" in lines:
        assert facts.sfq is False
    elif "CONFIG_NET_SCH_SFQ=y" in lines:
        assert facts.sfq is True
    else:
        assert facts.sfq is not None
