"""vSphere access against the lab: retries, session loss, faults in one line, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import manage
from vmrep.config import Site
from vmrep.errors import NotFound, TransientError, VSphereError
from vmrep.vsphere.connection import Client, RetryPolicy, connect
from vmrep.vsphere.datastore import HttpDatastore
from vmrep.vsphere.inventory import Inventory
from vmrep.vsphere.property import retrieve_one

FAST = RetryPolicy(attempts=4, initial=0.01, maximum=0.05)


def client_for(lab, site: str = "siteA") -> Client:  # type: ignore[no-untyped-def]
    return connect(lab.config.sites[site], retry=FAST)


@pytest.mark.parametrize("action,fault", [("fault", "NotAuthenticated"), ("fault", "HostCommunication"),
                                          ("drop", None), ("http503", None)])
def test_transient_fault_in_inventory_read_is_retried(lab, action: str, fault: str | None) -> None:  # type: ignore[no-untyped-def]
    ctl = lab.control("siteA")
    with client_for(lab) as c:
        ctl.fault("RetrievePropertiesEx", action, fault, count=2)
        try:
            vms = Inventory(c).vms_by_name()
        finally:
            ctl.clear_faults()
        assert {"erp-db", "erp-app", "erp-web", "files-01"} <= set(vms)
        assert c.stats.retries == 2


def test_fault_that_stays_is_one_line(lab) -> None:  # type: ignore[no-untyped-def]
    ctl = lab.control("siteA")
    with client_for(lab) as c:
        ctl.fault("RetrievePropertiesEx", "http503", count=0)
        try:
            with pytest.raises(TransientError) as e:
                Inventory(c).vms()
        finally:
            ctl.clear_faults()
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith("site siteA: RetrievePropertiesEx on VirtualMachine/Network/")
        assert "still failing after 4 attempts" in msg


def test_permanent_fault_names_the_object_at_once(lab) -> None:  # type: ignore[no-untyped-def]
    ctl = lab.control("siteA")
    with client_for(lab) as c:
        vm = Inventory(c).vm("erp-web")
        ctl.fault("PowerOnVM_Task", "fault", "InvalidState", count=1)
        try:
            with pytest.raises(VSphereError) as e:
                c.call("VM erp-web", vm.ref.PowerOnVM_Task)
        finally:
            ctl.clear_faults()
        assert str(e.value).startswith("site siteA: VM erp-web: InvalidState")
        assert c.stats.retries == 0


def test_session_dropped_by_server_is_reestablished(lab) -> None:  # type: ignore[no-untyped-def]
    ctl = lab.control("siteA")
    with client_for(lab) as c:
        Inventory(c).vms()
        cookie_before = c.session_cookie
        ctl.drop_sessions()
        vms = Inventory(c).vms_by_name()  # NotAuthenticated -> login again -> same call succeeds
        assert "erp-db" in vms
        assert c.stats.relogins == 1
        assert c.session_cookie != cookie_before
        # The datastore interface follows the new session too.
        ds = HttpDatastore(c, "DC0")
        assert ds.size(vms["erp-db"].disks[0].flat) == vms["erp-db"].disks[0].capacity


def test_folder_demands_the_session(lab) -> None:  # type: ignore[no-untyped-def]
    import requests

    site = lab.site("siteA")
    with client_for(lab) as c:
        disk = Inventory(c).vm("erp-db").disks[0]
        http = HttpDatastore(c, "DC0")
        data = http.read(disk.flat, 0, 4096)
        local = Path(site.datastores["LocalDS_0"]) / "erp-db" / "disk0-flat.vmdk"
        assert data == local.read_bytes()[:4096]
    url = f"https://{site.host}/folder/erp-db/disk0-flat.vmdk?dcPath=DC0&dsName=LocalDS_0"
    r = requests.get(url, verify=site.ca_file, headers={"Range": "bytes=0-15"}, timeout=5)
    assert r.status_code == 401


def test_wrong_credentials_are_one_line(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from vmrep.errors import ConnectionFailed

    site = lab.config.sites["siteA"]
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password")
    site.password.file = wrong
    with pytest.raises(ConnectionFailed) as e:
        connect(site, retry=FAST)
    assert str(e.value) == "site siteA: login refused for user 'lab-admin' (wrong credentials)"


def test_unknown_object_is_not_found(lab) -> None:  # type: ignore[no-untyped-def]
    with client_for(lab) as c:
        with pytest.raises(NotFound, match="site siteA: VM 'nope' not found"):
            Inventory(c).vm("nope")


def test_collector_reads_of_1000_vms_take_constant_round_trips(tmp_path: Path) -> None:
    site = manage.start_site("big", tmp_path / "big", vms_per_pool=500)  # cluster + host: 1,000 VMs
    try:
        cfg = Site(name="big", host=site.host, password={"env": "UNUSED"}, tls={"ca_file": site.ca_file})
        import requests

        ctl = site.control_url
        with Client(cfg, "x", retry=FAST) as c:
            requests.delete(f"{ctl}/calls", timeout=5)
            inv = Inventory(c)
            vms = inv.vms()
            first = requests.get(f"{ctl}/calls", timeout=5).json()
            assert len(vms) == 1000
            assert all(v.disks for v in vms)
            # The same read again costs exactly the same: one RetrievePropertiesEx, whatever N is.
            requests.delete(f"{ctl}/calls", timeout=5)
            Inventory(c).vms()
            second = requests.get(f"{ctl}/calls", timeout=5).json()
        assert first.get("RetrievePropertiesEx") == 1
        assert second == {"RetrievePropertiesEx": 1}
        assert sum(first.values()) <= 2  # + the container view, created once per session
    finally:
        manage.stop_site(site)


def test_unset_property_reads_do_not_break_the_session(lab) -> None:  # type: ignore[no-untyped-def]
    with client_for(lab) as c:
        vm = Inventory(c).vm("erp-app")
        got = retrieve_one(c, vm.ref, ["snapshot", "name"])
        assert got.get("snapshot") is None and got.name == "erp-app"
        # and the session still works afterwards
        assert Inventory(c).vm("erp-app").name == "erp-app"


def test_task_waits_through_wait_for_updates_not_polling(lab) -> None:  # type: ignore[no-untyped-def]
    """A task wait is a filter on the task and WaitForUpdatesEx (as govmomi's task
    package), not RetrievePropertiesEx polls; the VM object layer goes through it."""
    import requests

    from vmrep.vsphere import vm as vmops

    ctl = lab.site("siteA").control_url
    with client_for(lab) as c:
        vm = Inventory(c).vm("files-01")
        requests.delete(f"{ctl}/calls", timeout=5)
        snap = vmops.create_snapshot(c, vm.name, vm.ref, "vmrep-test-wait", "test snapshot")
        calls = requests.get(f"{ctl}/calls", timeout=5).json()
        assert calls.get("CreateSnapshot_Task") == 1
        assert calls.get("CreateFilter") == 1 and calls.get("WaitForUpdatesEx", 0) >= 1
        assert "RetrievePropertiesEx" not in calls
        assert calls.get("DestroyPropertyCollector") == 1  # the wait's own collector, removed after
        tree = retrieve_one(c, vm.ref, ["snapshot"]).get("snapshot")
        assert [s._moId for s in vmops.find_snapshots(tree, "vmrep-test-wait")] == [snap._moId]
        vmops.revert_to_snapshot(c, vm.name, snap)
        assert retrieve_one(c, vm.ref, ["snapshot"]).get("snapshot").currentSnapshot._moId == snap._moId
        vmops.remove_snapshot(c, vm.name, snap, "remove test snapshot")
        tree = retrieve_one(c, vm.ref, ["snapshot"]).get("snapshot")
        assert vmops.find_snapshots(tree, "vmrep-test-wait") == []


def test_task_that_fails_raises_its_fault_in_one_line(lab) -> None:  # type: ignore[no-untyped-def]
    from vmrep.vsphere import vm as vmops

    with client_for(lab) as c:
        vm = Inventory(c).vm("erp-web")
        assert vmops.power_state(c, vm.ref) == "poweredOn"
        with pytest.raises(VSphereError) as e:
            vmops.power_on(c, vm.name, vm.ref)  # already on: the task ends in error
        assert str(e.value).startswith("site siteA: VM erp-web: power on: InvalidPowerState")
        assert "\n" not in str(e.value)


def test_task_wait_survives_a_new_session(lab) -> None:  # type: ignore[no-untyped-def]
    """The session ends while waiting: the client logs in again, the wait's collector
    (which died with the old session) is made anew, and the wait still ends."""
    from vmrep.vsphere import vm as vmops

    ctl = lab.control("siteA")
    with client_for(lab) as c:
        vm = Inventory(c).vm("files-01")
        ctl.fault("WaitForUpdatesEx", "fault", "NotAuthenticated", count=1)
        try:
            snap = vmops.create_snapshot(c, vm.name, vm.ref, "vmrep-test-relogin", "test snapshot")
        finally:
            ctl.clear_faults()
        assert c.stats.relogins == 1
        vmops.remove_snapshot(c, vm.name, snap, "remove test snapshot")
