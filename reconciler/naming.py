"""The names of everything nanod makes on a cell, from one prefix, and what counts as ours.

Several nanods may share a host: the one `scripts/setup` started (prefix `nano`, the
default) and the test suite's (prefix `nanotest`), or two installations. Each makes and
owns only objects that carry its prefix (setting `names.prefix`):

| object on the cell                  | name (prefix `nano`)                                  |
|-------------------------------------|-------------------------------------------------------|
| guest domain (+ our `<metadata>`)   | `nano-<guest id>`                                     |
| guest volumes                       | `nano-<guest id>-disk<N>`, `nano-<guest id>-seed.iso` |
| cached image copies                 | `nano-disk-<image>-v<version>`, `nano-media-...`      |
| libvirt storage pools               | `nano-<cell>`, `nano-shared-<storage pool>`           |
| NFS mount point                     | `/var/lib/nano/mnt/<storage pool>`                    |
| address pool network and bridge     | `nano-net-<address pool>`, `nanobr-<hash>`            |
| nftables                            | table `nano` (security policies), `ip nano_nat_<hash>`|

A domain is ours when it carries our `<metadata>` mark *and* its name is our prefix and
the mark's guest id: a domain with the mark under another prefix belongs to another nanod
and is neither changed, deleted, nor listed among the cell's unowned domains. Prefixes
are 2 to 8 lowercase letters and digits, no separator, so no prefix's names start with
another's (`nano-` never begins `nanotest-...`), and the bridge, `<prefix>br-` and a hash,
stays within Linux's 15 characters (8 hex digits for `nano`, 4 for an 8-letter prefix).

The active names are process-wide: one nanod per process (its data directory is locked),
and the names reach deep into pure renderers (the nft table in every rule, a domain's
name in its XML) that would otherwise all take one more parameter. `reconciler.kinds.build`
sets them from the settings before any reconciler runs; tests set theirs at start.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from state.errors import Invalid

DEFAULT_PREFIX = "nano"
_PREFIX = re.compile(r"^[a-z][a-z0-9]{1,7}$")
_IFNAMSIZ = 15  # Linux interface names: at most 15 bytes


def check_prefix(prefix: object) -> str:
    """The prefix if valid, else ValueError naming the rule."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ValueError(f"names.prefix {prefix!r}: 2 to 8 lowercase letters and digits, "
                         "starting with a letter (e.g. nano)")
    return prefix


@dataclass(frozen=True)
class Names:
    """Every name nanod gives an object on a cell, for one prefix (see the module doc)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    # -- guests and volumes ------------------------------------------------------------

    @property
    def owned(self) -> str:
        """What every libvirt domain, volume, pool and network name of ours starts with."""
        return f"{self.prefix}-"

    def require_owned(self, name: str, what: str) -> None:
        """The drivers' last guard: Invalid unless `name` is one of our names."""
        if not name.startswith(self.owned):
            raise Invalid(f"refusing to {what}: {name!r} is not ours (our names start "
                          f"with {self.owned!r})")

    def domain(self, guest_id: str) -> str:
        return f"{self.prefix}-{guest_id}"

    def owns_domain(self, name: str, marked_id: str | None) -> bool:
        """A domain is ours when it carries our mark with guest id G and is named for G."""
        return marked_id is not None and name == self.domain(marked_id)

    def volume(self, guest_id: str, index: int) -> str:
        return f"{self.prefix}-{guest_id}-disk{index}"

    def seed_volume(self, guest_id: str) -> str:
        return f"{self.prefix}-{guest_id}-seed.iso"

    def guest_volumes(self, guest_id: str) -> str:
        """What the names of every volume of one guest start with."""
        return f"{self.prefix}-{guest_id}-"

    def image_volume(self, kind: str, image_id: str, version: int) -> str:
        """A cell's cached copy of a disk or media image version."""
        return f"{self.prefix}-{kind}-{image_id}-v{version}"

    # -- storage pools -----------------------------------------------------------------

    def local_pool(self, cell: str) -> str:
        """The libvirt dir pool of a cell's local storage path (per cell: two cells may
        share one libvirtd in tests and demos)."""
        return f"{self.prefix}-{cell}"

    def shared_pool(self, storage_pool: str) -> str:
        return f"{self.prefix}-shared-{storage_pool}"

    def shared_mount(self, storage_pool: str) -> str:
        return f"/var/lib/{self.prefix}/mnt/{storage_pool}"

    # -- networks and nftables ---------------------------------------------------------

    @property
    def network_prefix(self) -> str:
        return f"{self.prefix}-net-"

    def network(self, address_pool: str) -> str:
        return f"{self.network_prefix}{address_pool}"

    @property
    def bridge_prefix(self) -> str:
        return f"{self.prefix}br-"

    @property
    def nat_prefix(self) -> str:
        return f"{self.prefix}_nat_"

    def _hash(self, address_pool: str) -> str:
        digits = _IFNAMSIZ - len(self.bridge_prefix)
        return hashlib.sha1(address_pool.encode()).hexdigest()[:digits]

    def bridge(self, address_pool: str) -> str:
        """The host bridge of the pool's network: `<prefix>br-` and a hash of the pool
        name, 15 characters (pool names are longer than interface names may be)."""
        return self.bridge_prefix + self._hash(address_pool)

    def nat_table(self, address_pool: str) -> str:
        """The pool's `ip` NAT table; the same hash as its bridge, so a table whose bridge
        is gone can be found (`bridge_of_nat_table`)."""
        return self.nat_prefix + self._hash(address_pool)

    def bridge_of_nat_table(self, table: str) -> str:
        return self.bridge_prefix + table[len(self.nat_prefix):]

    @property
    def firewall_table(self) -> str:
        """The security policies' table, in whichever family: everything in it is ours."""
        return self.prefix

    def owns_nft_table(self, table: str) -> bool:
        return table == self.firewall_table or table.startswith(self.nat_prefix)


_active = Names()


def names() -> Names:
    """The names of this process's nanod."""
    return _active


def use(prefix: str) -> Names:
    """Make `prefix` this process's names (at start, before any reconciler runs)."""
    global _active
    _active = Names(check_prefix(prefix))
    return _active


@contextlib.contextmanager
def using(prefix: str) -> Iterator[Names]:
    """`use(prefix)` for the duration of a block (tests of pure code against listings
    captured from a table of another prefix)."""
    before = _active
    try:
        yield use(prefix)
    finally:
        use(before.prefix)
