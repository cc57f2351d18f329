"""reconciler/naming.py: production names are what they always were, another prefix owns
none of them (and the reverse), every bridge fits the kernel, bad prefixes are refused
(also in nanod's settings), and the drivers' guard refuses what is not ours."""

from __future__ import annotations

import hashlib

import pytest

from nanod import config
from reconciler.naming import DEFAULT_PREFIX, Names, names, using
from state.errors import Invalid
from tests.conftest import TEST_NAMES_PREFIX

GID = "2e8f2e23-d0e4-4db2-842c-f3f191252bc3"


def every_name(n: Names) -> dict[str, str]:
    return {
        "domain": n.domain(GID), "disk": n.volume(GID, 1), "seed": n.seed_volume(GID),
        "image": n.image_volume("disk", "img1", 3), "pool": n.local_pool("local"),
        "shared": n.shared_pool("nfs"), "network": n.network("office"),
        "bridge": n.bridge("office"), "nat": n.nat_table("office"),
        "table": n.firewall_table,
    }


def test_production_names_are_unchanged():
    sha = hashlib.sha1(b"office").hexdigest()[:8]
    assert every_name(Names()) == {
        "domain": f"nano-{GID}", "disk": f"nano-{GID}-disk1", "seed": f"nano-{GID}-seed.iso",
        "image": "nano-disk-img1-v3", "pool": "nano-local", "shared": "nano-shared-nfs",
        "network": "nano-net-office", "bridge": f"nanobr-{sha}", "nat": f"nano_nat_{sha}",
        "table": "nano",
    }
    assert Names().shared_mount("nfs") == "/var/lib/nano/mnt/nfs"
    assert Names().prefix == DEFAULT_PREFIX == config.DEFAULTS["names"]["prefix"]


@pytest.mark.parametrize("other", [TEST_NAMES_PREFIX, "nanob", "nan0", "nanonano"])
def test_no_prefix_owns_anothers_names(other):
    prod, test = Names("nano"), Names(other)
    for mine, theirs in ((prod, test), (test, prod)):
        for kind, name in every_name(theirs).items():
            if kind == "bridge":
                assert not name.startswith(mine.bridge_prefix), name
            elif kind in ("nat", "table"):
                assert not mine.owns_nft_table(name), (kind, name)
            else:
                assert not name.startswith(mine.owned), (kind, name)
        assert not mine.owns_domain(theirs.domain(GID), GID)
    assert prod.owns_domain(prod.domain(GID), GID) and not prod.owns_domain(prod.domain(GID),
                                                                            None)


@pytest.mark.parametrize("prefix", ["ab", "nano", TEST_NAMES_PREFIX, "z1234567"])
def test_bridges_fit_linux_interface_names_and_pair_with_their_nat_table(prefix):
    n = Names(prefix)
    for pool in ("a", "x" * 64, "pool-with-dashes_and.dots"):
        bridge = n.bridge(pool)
        assert len(bridge) <= 15 and len(bridge) - len(n.bridge_prefix) >= 4
        assert n.bridge_of_nat_table(n.nat_table(pool)) == bridge
    assert n.bridge("a") != n.bridge("b")


@pytest.mark.parametrize("bad", ["", "n", "Nano", "nano-x", "nano_x", "1nano", "nanotest1", 7])
def test_bad_prefixes_are_refused_with_the_rule(bad, tmp_path):
    with pytest.raises(ValueError, match="2 to 8 lowercase letters and digits"):
        Names(bad)
    path = tmp_path / "nanod.yaml"
    path.write_text(f"names: {{prefix: {bad!r}}}\n")
    with pytest.raises(SystemExit, match="names.prefix"):
        config.load(str(path), {})


def test_settings_carry_the_prefix(tmp_path):
    path = tmp_path / "nanod.yaml"
    path.write_text("names: {prefix: lab}\n")
    assert config.load(str(path), {})["names"] == {"prefix": "lab"}
    assert config.load(None, {})["names"] == {"prefix": "nano"}
    path.write_text("names: {prefix: lab, table: x}\n")
    with pytest.raises(SystemExit, match="names must be"):
        config.load(str(path), {})


def test_the_drivers_guard_and_the_process_wide_names():
    assert names().prefix == TEST_NAMES_PREFIX  # set for the whole suite by tests/conftest.py
    names().require_owned(f"{TEST_NAMES_PREFIX}-x", "delete volume")
    with pytest.raises(Invalid, match="refusing to delete volume: 'nano-x' is not ours"):
        names().require_owned("nano-x", "delete volume")
    with using("nano") as prod:
        assert names() is prod and prod.domain("g") == "nano-g"
    assert names().prefix == TEST_NAMES_PREFIX
