"""Drivers: the only code that talks to cells (ARCHITECTURE.md §3, §4).

Each module adapts one technology behind a small interface and translates its errors into
ours (`state.errors`: NotFound, Conflict, Unavailable, Permanent, Invalid) at the edge:

- `shell`: `HostShell` (run an argv on a cell) as `LocalShell` and `ParamikoShell` (SSH),
  plus SSH tunnels for VNC consoles;
- `facts`: host facts (CPU, memory, disks, bridges, versions, I/O counters) gathered in
  one shell round trip, with pure parsers;
- `libvirt_hv`: `LibvirtHypervisor`, one libvirt connection per cell (node info, domains
  and their ownership mark, storage pools, lifecycle events).

Reconcilers and the composition root (`nanod`) import these modules; nothing outside this
package imports `libvirt` or `paramiko`. Importing the package itself imports neither.
"""
