"""Table tests of the pure guest planner (reconciler/guest_plan.py) and of `guest_want`,
which turns a stored guest into the planner's input.

Each case states a stored guest (spec + recorded bookkeeping) and what the cell shows, and
asserts the plan: action kinds in order, their effect class, holds (the reasons a user
sees in Ready) and drift. The convergence triad holds for every case that converges:
executing the plan and observing again gives an empty plan.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from reconciler.guest_plan import (
    CellCaps,
    Do,
    Effect,
    GuestPlan,
    HoldReason,
    ObservedGuest,
    field_effects,
    plan_guest,
    ready_reason,
)
from reconciler.guest_xml import parse_domain_xml, render_domain_xml
from reconciler.guests import (
    Placement,
    guest_want,
    image_volume,
    seed_volume,
    volume_name,
)
from state.guests import GuestDesired, SnapshotDesired

GID = "6f1c3f0e-4c1e-4d3b-9f57-3c1f8e0a0001"
MiB, GiB = 1 << 20, 1 << 30
PLACE = Placement(pool="nano-c1", network="nano-net-ap", bridge="br0", virt_type="qemu")
IMAGES = {"img1": {"version": 3}, "iso1": {"version": 1}}


def stored(**spec_changes: Any) -> GuestDesired:
    """A created, converged guest: 2 cores, 1 GiB, two disks, stopped, one NIC."""
    spec: dict[str, Any] = {
        "cores": 2, "memory": GiB, "disks": [4 * GiB, GiB], "auto_start": False,
        "system": "linux", "template": "", "template_spec": {
            "admin": "root", "operating_system": "linux", "disk": "scsi",
            "network": "virtio", "display": "vga", "control": "vnc", "usb": "",
            "tablet": "usb"},
        "modules": [], "cloud_init": {}, "qos": {"cpu_priority": "medium", "write_speed": 0,
                                                 "write_iops": 0, "read_speed": 0,
                                                 "read_iops": 0, "receive_speed": 0,
                                                 "send_speed": 0},
        "ethernet_address": "00:16:3e:00:00:01", "network_address": "", "ports": [],
        "from_image": "", "security_policy_group": "", "monitor_secret": "s3cretAB",
        "instance_id": "i-1", "power": "stopped", "power_request": 0,
        "stop_mode": "shutdown", "stop_escalate": False,
        "restart": {"counter": 0, "mode": "reboot"}, "boot_once": None, "media": "",
        "admin": {"user": "root", "password": "", "generation": 0}, "system_reset": None,
        "restore": None, "current_snapshot": "", "disk_shrink": {},
        "immediate": {"cores": False, "memory": False, "disks": {}},
    }
    spec.update(spec_changes)
    return GuestDesired(
        id=GID, name="web", pool="p1", cell="c1", owner="admin", group="admin", batch="",
        generation=5, deleting=False, spec=spec, storage_pool="", address_pool="ap",
        interfaces=({"type": "internal", "mac": "00:16:3e:00:00:01", "address": "10.0.0.5"},),
        snapshots=(), phase="stopped", observed_generation=5,
        observed={"created": True, "max_vcpus": 4, "max_memory": GiB, "power_request": 0,
                  "restart_counter": 0})


def changed(guest: GuestDesired, *, recorded: dict[str, Any] | None = None,
            bump: bool = True, **spec: Any) -> GuestDesired:
    """`guest` with spec keys replaced (a new generation, as the API would store it)."""
    new_spec = copy.deepcopy(guest.spec)
    new_spec.update(spec)
    rec = {**guest.observed, **(recorded or {})}
    return dataclasses.replace(guest, spec=new_spec, observed=rec,
                               generation=guest.generation + (1 if bump else 0))


def want_of(guest: GuestDesired, now: float = 1000.0):
    return guest_want(guest, PLACE, max_cores=24, images=IMAGES,
                      paths=lambda v: f"/pool/{v}", now=now, stop_grace_seconds=60.0)


def converged_cell(guest: GuestDesired, *, state: str = "stopped", reason: str = "shutdown",
                   **changes: Any) -> ObservedGuest:
    """What the cell shows for `guest` once converged: parse(render(desired))."""
    want, needs = want_of(guest)
    xml = render_domain_xml(want.config)
    config = parse_domain_xml(xml)
    live = None
    if state == "running":
        live = dataclasses.replace(parse_domain_xml(render_domain_xml(want.running_spec)),
                                   domain_id=7)
    volumes = {v.name: v.size for v in want.volumes}
    if "cloud-init" in guest.spec["modules"]:
        volumes[want.seed_volume] = 0
    values: dict[str, Any] = dict(
        defined=True, state=state, state_reason=reason if state == "stopped" else "",
        config=config, live=live, volumes=volumes, images=frozenset(n.volume for n in needs),
        snapshots=frozenset(s.name for s in guest.snapshots if s.phase == "created"),
        autostart=bool(guest.spec["auto_start"]), network=(True, True, ""),
        caps=CellCaps(cell="c1", bandwidth=True))
    values.update(changes)
    return ObservedGuest(**values)


def plan(guest: GuestDesired, observed: ObservedGuest, now: float = 1000.0) -> GuestPlan:
    return plan_guest(want_of(guest, now)[0], observed)


def kinds(p: GuestPlan) -> list[Do]:
    return [a.do for a in p.actions]


def holds(p: GuestPlan) -> list[HoldReason]:
    return [h.reason for h in p.holds]


# -- converged, and the triad ---------------------------------------------------------


@pytest.mark.parametrize("state", ["stopped", "running"])
def test_a_converged_guest_plans_nothing_and_is_ready(state: str) -> None:
    guest = stored(power="running" if state == "running" else "stopped")
    p = plan(guest, converged_cell(guest, state=state))
    assert p.converged and not p.drift
    assert ready_reason(p) == (True, "Converged", "the domain matches the spec")


# -- creation ------------------------------------------------------------------------


def test_a_new_guest_from_an_image_with_cloud_init_is_built_in_order() -> None:
    guest = dataclasses.replace(
        stored(from_image="img1", modules=["cloud-init"], auto_start=True,
               power="running", power_request=1),
        observed={}, observed_generation=0, phase="creating")
    p = plan(guest, ObservedGuest(defined=False, network=(True, True, ""),
                                  caps=CellCaps(cell="c1")))
    assert kinds(p) == [Do.SEND_IMAGE, Do.CREATE_VOLUME, Do.CREATE_VOLUME, Do.WRITE_SEED,
                        Do.DEFINE, Do.SET_AUTOSTART, Do.START]
    assert p.actions[0].args["volume"] == image_volume("disk", "img1", 3)
    assert p.actions[1].args["backing"] == image_volume("disk", "img1", 3)
    assert p.actions[2].args["backing"] == ""
    assert p.actions[4].args["spec"].max_vcpus == 4  # room to grow live: twice the cores
    assert not p.drift and not p.holds
    # the image already on the cell is not sent again
    cached = plan(guest, ObservedGuest(defined=False, network=(True, True, ""),
                                       images=frozenset({image_volume("disk", "img1", 3)})))
    assert Do.SEND_IMAGE not in kinds(cached)


def test_a_new_guest_waits_for_its_network_to_start_but_is_built() -> None:
    guest = dataclasses.replace(stored(power="running", power_request=1), observed={},
                                observed_generation=0)
    p = plan(guest, ObservedGuest(defined=False, network=(True, False, "Unable to find "
                                                          "'dnsmasq' binary")))
    assert kinds(p) == [Do.CREATE_VOLUME, Do.CREATE_VOLUME, Do.DEFINE]
    assert holds(p) == [HoldReason.NETWORK_NOT_READY]
    assert "dnsmasq" in p.holds[0].message and "nano-net-ap" in p.holds[0].message
    ready, reason, message = ready_reason(p)
    assert (ready, reason) == (False, "NetworkNotReady")
    # a network that is defined, inactive and without an error is started with the guest
    quiet = plan(guest, ObservedGuest(defined=False, network=(True, False, "")))
    assert kinds(quiet)[-1] is Do.START and not quiet.holds


# -- what the cell cannot do -----------------------------------------------------------


def test_a_test_driver_cell_refuses_images_and_seeds_at_once() -> None:
    guest = dataclasses.replace(stored(from_image="img1", modules=["cloud-init"]),
                                observed={}, observed_generation=0)
    no_streams = CellCaps(volume_streams=False, cell="sim-1")
    p = plan(guest, ObservedGuest(defined=False, network=(True, True, ""), caps=no_streams))
    assert p.actions == () and holds(p) == [HoldReason.MISSING_CAPABILITY]
    assert p.blocked is not None
    message = p.holds[0].message
    assert "sim-1" in message and "volume streams" in message
    assert "disk image img1" in message and "cloud-init seed" in message
    # a blank guest is fine on such a cell
    blank = dataclasses.replace(stored(), observed={}, observed_generation=0)
    assert plan(blank, ObservedGuest(defined=False, network=(True, True, ""),
                                     caps=no_streams)).blocked is None


def test_network_speed_limits_need_sfq_on_the_cell() -> None:
    qos = {**stored().spec["qos"], "receive_speed": 1 << 20}
    guest = changed(stored(), qos=qos)
    caps = CellCaps(cell="c1", bandwidth=False,
                    bandwidth_missing="its kernel has no sfq qdisc (CONFIG_NET_SCH_SFQ is not "
                                      "set)")
    p = plan(guest, converged_cell(stored(), caps=caps))
    assert p.actions == () and p.blocked is not None
    assert "CONFIG_NET_SCH_SFQ" in p.holds[0].message
    assert "receive_speed and send_speed to 0" in p.holds[0].message
    # unknown (no kernel config to read) does not refuse
    unknown = plan(guest, converged_cell(stored(), caps=CellCaps(cell="c1", bandwidth=None)))
    assert unknown.blocked is None and Do.DEFINE in kinds(unknown)


# -- changes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "immediate", "expect_kinds", "expect_holds", "effect"), [
    ("stopped", False, [Do.DEFINE], [], Effect.LIVE),
    ("running", False, [Do.DEFINE], [HoldReason.RESTART_REQUIRED], Effect.RESTART),
    ("running", True, [Do.DEFINE, Do.CHANGE_LIVE], [], Effect.LIVE),
])
def test_more_cores(state: str, immediate: bool, expect_kinds: list[Do],
                    expect_holds: list[HoldReason], effect: Effect) -> None:
    power = "running" if state == "running" else "stopped"
    before = stored(power=power)
    guest = changed(before, cores=3, immediate={"cores": immediate, "memory": False,
                                                "disks": {}})
    p = plan(guest, converged_cell(before, state=state))
    assert kinds(p) == expect_kinds and holds(p) == expect_holds
    assert field_effects(p)["cores"][0] is effect
    assert not p.drift  # a spec change, not drift


def test_cores_beyond_the_running_maximum_need_a_restart_even_when_immediate() -> None:
    before = stored(power="running")
    guest = changed(before, cores=8, immediate={"cores": True, "memory": False, "disks": {}})
    p = plan(guest, converged_cell(before, state="running"))
    assert holds(p) == [HoldReason.RESTART_REQUIRED]
    assert field_effects(p)["cores"][0] is Effect.RESTART


@pytest.mark.parametrize(("state", "immediate", "expect"), [
    ("stopped", False, Do.GROW_VOLUME),
    ("running", True, Do.GROW_DISK_LIVE),
    ("running", False, None),
])
def test_a_disk_grows(state: str, immediate: bool, expect: Do | None) -> None:
    before = stored(power="running" if state == "running" else "stopped")
    guest = changed(before, disks=[4 * GiB, 2 * GiB],
                    immediate={"cores": False, "memory": False, "disks": {"1": immediate}})
    p = plan(guest, converged_cell(before, state=state))
    if expect is None:
        assert kinds(p) == [] and holds(p) == [HoldReason.RESTART_REQUIRED]
        assert "grows from" in p.holds[0].message
    else:
        assert kinds(p) == [expect] and p.actions[0].args["size"] == 2 * GiB


def test_qos_changes_live_on_a_running_guest() -> None:
    before = stored(power="running")
    qos = {**before.spec["qos"], "cpu_priority": "high", "read_speed": 1 << 20}
    p = plan(changed(before, qos=qos), converged_cell(before, state="running"))
    # shares, and the read limit of each of the two disks
    assert kinds(p) == [Do.DEFINE, Do.CHANGE_LIVE, Do.CHANGE_LIVE, Do.CHANGE_LIVE]
    assert {a.field for a in p.actions} == {"qos"}
    assert field_effects(p)["qos"][0] is Effect.LIVE and not p.holds


def test_media_needs_its_image_on_the_cell_first() -> None:
    before = stored(power="running")
    guest = changed(before, media="iso1")
    observed = converged_cell(before, state="running", images=frozenset())
    p = plan(guest, observed)
    assert kinds(p) == [Do.SEND_IMAGE, Do.DEFINE, Do.CHANGE_LIVE]
    assert p.actions[0].args == {"image": "iso1", "kind": "media",
                                 "volume": image_volume("media", "iso1", 1)}
    assert p.actions[2].field == "media"


def test_a_system_reset_is_destructive_and_waits_for_a_stop() -> None:
    before = stored(power="running")
    guest = changed(before, from_image="img1",
                    system_reset={"from_image": "img1", "generation": 1})
    running = plan(guest, converged_cell(before, state="running"))
    assert kinds(running) == [] and holds(running) == [HoldReason.WAITING_FOR_STOP]
    stopped_guest = changed(guest, bump=False, power="stopped")
    stopped = plan(stopped_guest, converged_cell(before, state="stopped", images=frozenset()))
    assert kinds(stopped) == [Do.SEND_IMAGE, Do.RESET_SYSTEM]
    assert stopped.actions[1].effect is Effect.DESTRUCTIVE
    assert field_effects(stopped)["from_image"][0] is Effect.DESTRUCTIVE


def test_snapshots_are_taken_and_deleted_while_stopped() -> None:
    snaps = (SnapshotDesired("s1", "", "", False, 1, "created", ""),
             SnapshotDesired("s2", "s1", "second", False, 1, "creating", ""),
             SnapshotDesired("s3", "", "", True, 1, "created", ""))
    guest = dataclasses.replace(stored(), snapshots=snaps)
    observed = converged_cell(guest, snapshots=frozenset({"s1", "s3"}))
    p = plan(guest, observed)
    assert [(a.do, a.args.get("snapshot")) for a in p.actions] == [
        (Do.DELETE_SNAPSHOT, "s3"), (Do.CREATE_SNAPSHOT, "s2")]
    assert field_effects(p)["snapshots"][0] is Effect.DESTRUCTIVE
    running = plan(dataclasses.replace(guest, spec={**guest.spec, "power": "running"}),
                   dataclasses.replace(observed, state="running", state_reason="",
                                       live=dataclasses.replace(observed.config, domain_id=3)))
    assert kinds(running) == [] and holds(running) == [HoldReason.WAITING_FOR_STOP]


# -- power -----------------------------------------------------------------------------


def test_a_start_request_starts_once() -> None:
    before = stored()
    guest = changed(before, power="running", power_request=1)
    p = plan(guest, converged_cell(before))
    assert kinds(p) == [Do.START] and p.actions[0].args["request"] == 1
    handled = changed(guest, bump=False, recorded={"power_request": 1})
    assert plan(handled, converged_cell(handled, state="running")).converged


def test_a_guest_that_powered_itself_off_stays_off_and_says_so() -> None:
    guest = changed(stored(), bump=False, power="running", power_request=1,
                    recorded={"power_request": 1})
    p = plan(guest, converged_cell(guest, state="stopped", reason="shutdown"))
    assert kinds(p) == [] and holds(p) == [HoldReason.POWERED_OFF_BY_GUEST]
    ready, reason, message = ready_reason(p)
    assert not ready and reason == "PoweredOffByGuest" and "POST /instances/" in message
    assert not p.drift


def test_a_crashed_guest_stays_off() -> None:
    guest = changed(stored(), bump=False, power="running", power_request=1,
                    recorded={"power_request": 1})
    p = plan(guest, converged_cell(guest, state="stopped", reason="crashed"))
    assert kinds(p) == [] and holds(p) == [HoldReason.CRASHED]


@pytest.mark.parametrize("reason", ["destroyed", "unknown", "failed"])
def test_a_guest_stopped_behind_nanos_back_is_drift_and_started(reason: str) -> None:
    guest = changed(stored(), bump=False, power="running", power_request=1,
                    recorded={"power_request": 1})
    p = plan(guest, converged_cell(guest, state="stopped", reason=reason))
    assert kinds(p) == [Do.START] and p.drift
    assert f"stopped outside nano ({reason})" in p.drift[0]


def test_a_stop_request_is_sent_then_waits_then_escalates() -> None:
    before = changed(stored(), bump=False, power="running", power_request=1,
                     recorded={"power_request": 1})
    guest = changed(before, power="stopped", power_request=2, stop_escalate=True)
    p = plan(guest, converged_cell(before, state="running"))
    assert kinds(p) == [Do.SHUTDOWN]
    sent = changed(guest, bump=False, recorded={"power_request": 2, "stop_sent_at": 990.0})
    waiting = plan(sent, converged_cell(before, state="running"), now=1000.0)
    assert kinds(waiting) == [] and holds(waiting) == [HoldReason.STOPPING]
    late = plan(sent, converged_cell(before, state="running"), now=1100.0)
    assert kinds(late) == [Do.DESTROY]


def test_a_guest_running_against_the_last_request_is_reported() -> None:
    guest = stored()  # power stopped, no request pending
    p = plan(guest, converged_cell(guest, state="running"))
    assert kinds(p) == [] and holds(p) == [HoldReason.NOT_STOPPED]


def test_a_request_already_satisfied_is_recorded() -> None:
    before = stored()
    guest = changed(before, power="stopped", power_request=3)
    p = plan(guest, converged_cell(before))
    assert kinds(p) == [Do.RECORD] and p.actions[0].args == {"request": 3}


def test_a_reboot_request_of_a_stopped_guest_is_recorded_only() -> None:
    guest = changed(stored(), restart={"counter": 2, "mode": "reset"})
    assert [(a.do, dict(a.args)) for a in plan(guest, converged_cell(stored())).actions] == \
        [(Do.RECORD, {"restart_counter": 2})]
    running = changed(guest, bump=False, power="running")
    p = plan(running, converged_cell(running, state="running"))
    assert kinds(p) == [Do.RESET]


# -- drift -----------------------------------------------------------------------------


def test_memory_edited_on_the_cell_is_drift_and_is_corrected() -> None:
    guest = stored()
    edited = dataclasses.replace(converged_cell(guest).config, memory_bytes=512 * MiB)
    p = plan(guest, converged_cell(guest, config=edited))
    assert kinds(p) == [Do.DEFINE]
    assert p.drift and "memory_bytes" in p.drift[0]


def test_an_undefined_domain_is_drift_and_is_defined_again_with_its_disks() -> None:
    guest = changed(stored(), bump=False, power="running", power_request=1,
                    recorded={"power_request": 1})
    cell = converged_cell(guest, defined=False, state=None, config=None)
    p = plan(guest, cell)
    assert kinds(p) == [Do.DEFINE, Do.START]
    assert not p.actions[0].args["first"]
    assert any("vanished" in d for d in p.drift)


def test_an_undefined_domain_whose_disks_are_gone_is_not_recreated_blank() -> None:
    guest = stored()
    cell = converged_cell(guest, defined=False, state=None, config=None, volumes={})
    p = plan(guest, cell)
    assert p.actions == () and p.blocked is not None
    assert p.blocked.reason is HoldReason.VOLUME_MISSING and "data is gone" in p.blocked.message
    assert p.drift


def test_differences_of_a_new_generation_are_not_drift() -> None:
    before = stored()
    guest = changed(before, memory=2 * GiB)
    p = plan(guest, converged_cell(before))
    assert kinds(p) == [Do.DEFINE] and not p.drift


# -- the agent -------------------------------------------------------------------------


def test_a_password_reset_waits_for_a_running_guest() -> None:
    guest = changed(stored(), admin={"user": "root", "password": "N3w-pass", "generation": 1})
    stopped = plan(guest, converged_cell(stored()))
    assert holds(stopped) == [HoldReason.PASSWORD_PENDING]
    running = changed(guest, bump=False, power="running")
    p = plan(running, converged_cell(running, state="running"))
    assert kinds(p) == [Do.SET_PASSWORD]
    assert all("N3w-pass" not in a.describe() for a in p.actions)


# -- guest_want --------------------------------------------------------------------------


def test_guest_want_names_every_volume_and_refuses_a_missing_image() -> None:
    guest = dataclasses.replace(stored(from_image="img1", modules=["cloud-init"]),
                                observed={})
    want, needs = want_of(guest)
    assert [v.name for v in want.volumes] == [volume_name(GID, 0), volume_name(GID, 1)]
    assert want.seed_volume == seed_volume(GID)
    assert want.config.seed_iso == f"/pool/{seed_volume(GID)}"
    assert [n.volume for n in needs] == [image_volume("disk", "img1", 3)]
    from state.errors import Permanent

    with pytest.raises(Permanent, match="disk image gone"):
        guest_want(dataclasses.replace(guest, spec={**guest.spec, "from_image": "gone"}),
                   PLACE, max_cores=24, images={}, paths=str, now=0.0,
                   stop_grace_seconds=60.0)


def test_a_seed_written_from_an_older_spec_is_written_again() -> None:
    """The seed on the cell was written for another admin password generation (a pass
    that read the guest before `PUT /guests/{id}/auth`): present is not enough, the seed
    is written again, live, and the guest is not Ready until it is."""
    guest = changed(stored(modules=["cloud-init"]), bump=False,
                    recorded={"seed_digest": "digest-of-generation-0"})
    cell = converged_cell(guest)

    def planned(digest: str) -> GuestPlan:
        want = dataclasses.replace(want_of(guest)[0], seed_digest=digest)
        return plan_guest(want, cell)

    assert planned("digest-of-generation-0").converged
    stale = planned("digest-of-generation-1")
    assert kinds(stale) == [Do.WRITE_SEED]
    assert stale.actions[0].effect is Effect.LIVE and "out of date" in stale.actions[0].reason
    assert ready_reason(stale)[0] is False
    assert planned("").converged  # no digest to compare (a dry run): nothing claimed
