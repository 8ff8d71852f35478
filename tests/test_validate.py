"""`vmrep validate` against the live two-site lab, and what may not be protected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pyVmomi import vim

from vmrep.cli import main
from vmrep.config import DomainControllerMarker, load_config
from vmrep.protection import exclusions
from vmrep.validate import validate
from vmrep.vsphere.connection import connect
from vmrep.vsphere.inventory import Inventory, VMInfo, parse_devices
from vmrep.vsphere.task import run_task


def derived_config(lab, tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(lab.config_path.read_text())
    edit(data)
    p = tmp_path / "vmrep.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_clean_lab_validates(lab, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert main(["validate", "--config", str(lab.config_path)]) == 0
    assert "ok: erp, files" in capsys.readouterr().out


def test_unknown_vm_and_names_are_named(lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    def edit(d: dict) -> None:
        d["vpgs"][0]["vms"].append({"name": "ghost-vm"})
        d["vpgs"][0]["recovery"]["datastore"] = "NoSuchDS"
        d["vpgs"][1]["recovery"]["test_network"] = "prod"

    rc = main(["validate", "--config", str(derived_config(lab, tmp_path, edit))])
    out = capsys.readouterr()
    assert rc == 1
    lines = out.out.strip().splitlines()
    assert "VPG erp: VM ghost-vm: not found at protected site siteA" in lines
    assert "VPG erp: recovery.datastore: datastore 'NoSuchDS' not found at recovery site siteB" in lines
    assert ("VPG files: recovery.test_network: is the production network; "
            "a test must run in an isolated network") in lines
    assert out.err.strip() == ("error: 3 problem(s) found in VPG erp: VM ghost-vm, VPG erp: recovery.datastore, "
                               "VPG files: recovery.test_network")


def test_wan_compression_off_is_a_warning_that_it_has_no_effect(lab, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    def edit(d: dict) -> None:
        d["vpgs"][0]["wan_compression"] = False

    cfg = derived_config(lab, tmp_path, edit)
    assert main(["validate", "--config", str(cfg)]) == 0  # a warning, not a problem
    out = capsys.readouterr()
    assert out.err.strip().splitlines() == [
        "warning: VPG erp: wan_compression: false has no effect yet: blocks are always compressed"]
    assert "ok: erp, files" in out.out
    assert main(["validate", "--config", str(cfg), "--json"]) == 0
    assert [w["line"] for w in json.loads(capsys.readouterr().out)["warnings"]] == [
        "VPG erp: wan_compression: false has no effect yet: blocks are always compressed"]
    # the default (true) says nothing
    assert main(["validate", "--config", str(lab.config_path)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_wrong_site_address_is_a_clear_connection_error(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    def edit(d: dict) -> None:
        d["sites"]["siteB"]["host"] = "127.0.0.1:9"  # discard port: nothing listens

    cfg = load_config(derived_config(lab, tmp_path, edit))
    problems = [p.line() for p in validate(cfg, ["erp"])]
    assert len(problems) == 1
    assert problems[0].startswith("VPG erp: site siteB: site siteB (127.0.0.1:9): cannot connect")


def test_untrusted_certificate_is_refused(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other_ca = lab.site("siteB").ca_file

    def edit(d: dict) -> None:
        d["sites"]["siteA"]["tls"] = {"ca_file": other_ca}  # siteB's CA does not sign siteA

    cfg = load_config(derived_config(lab, tmp_path, edit))
    with pytest.raises(Exception, match="TLS verification failed"):
        connect(cfg.sites["siteA"])


def test_pinned_thumbprint(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    thumb = lab.site("siteA").thumbprint

    def edit(d: dict) -> None:
        d["sites"]["siteA"]["tls"] = {"thumbprint": thumb}

    cfg = load_config(derived_config(lab, tmp_path, edit))
    with connect(cfg.sites["siteA"]) as c:
        disk = Inventory(c).vm("erp-db").disks[0]
        # the datastore files and the vAPI endpoint trust the same pin
        from vmrep.vsphere.datastore import HttpDatastore
        from vmrep.vsphere.tags import Tags

        assert HttpDatastore(c, "DC0").size(disk.flat) == disk.capacity
        assert Tags(c).of_vms([Inventory(c).vm("erp-db").ref]) is not None
    wrong = "00" * 32
    cfg.sites["siteA"].tls.thumbprint = wrong
    with pytest.raises(Exception, match="thumbprint"):
        connect(cfg.sites["siteA"])
    # The files and vAPI side refuses a wrong pin too, and the refusal is final: retrying a
    # certificate that is not the pinned one cannot help (urllib3 says so in its own words).
    import requests

    from vmrep.vsphere import faults
    from vmrep.vsphere.connection import http_session, http_verify

    site = cfg.sites["siteA"]
    with pytest.raises(requests.exceptions.SSLError) as refused:
        http_session(site).get(f"https://{site.host}/folder", verify=http_verify(site), timeout=10)
    assert not faults.is_transient(refused.value), str(refused.value)


def _vm(devices: list) -> VMInfo:  # type: ignore[type-arg]
    disks, nics = parse_devices(devices)
    return VMInfo(ref=None, name="x", uuid=None, power_state="poweredOn", host=None, disks=disks, nics=nics,
                  notes="", custom={}, extra={}, tools=None, ip=None, heartbeat=None, has_snapshot=False)


def test_rdm_refused_from_device_data() -> None:
    # The simulator crashes on RDM backings, so the device list is built here, as vCenter returns it.
    ctrl = vim.vm.device.VirtualLsiLogicController(key=1000, busNumber=0, sharedBus="noSharing")
    rdm = vim.vm.device.VirtualDisk(
        key=2000, controllerKey=1000, unitNumber=0, capacityInKB=1024,
        deviceInfo=vim.Description(label="Hard disk 1", summary=""),
        backing=vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo(
            fileName="[ds] x/x.vmdk", compatibilityMode="physicalMode", deviceName="/vmfs/devices/disks/naa.1"))
    found = exclusions(_vm([ctrl, rdm]), DomainControllerMarker())
    assert [(e.code, e.reason) for e in found] == [("rdm", "Hard disk 1 is a raw device mapping (RDM)")]


def _reconfigure(lab, vm_name: str, change) -> None:  # type: ignore[no-untyped-def]
    cfg = lab.config
    with connect(cfg.sites["siteA"]) as c:
        vm = Inventory(c).vm(vm_name)
        spec = change(vm)
        run_task(c, f"VM {vm_name}", vm.ref.ReconfigVM_Task, spec)


def test_excluded_kinds_refused_by_validate(fresh_lab, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    lab = fresh_lab

    def multi_writer(vm: VMInfo):  # type: ignore[no-untyped-def]
        with connect(lab.config.sites["siteA"]) as c:
            from vmrep.vsphere.property import retrieve_one

            devices = retrieve_one(c, vm.ref, ["config.hardware.device"]).get("config.hardware.device")
        disk = next(d for d in devices if isinstance(d, vim.vm.device.VirtualDisk))
        disk.backing.sharing = "sharingMultiWriter"
        return vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)])

    def shared_bus(vm: VMInfo):  # type: ignore[no-untyped-def]
        with connect(lab.config.sites["siteA"]) as c:
            from vmrep.vsphere.property import retrieve_one

            devices = retrieve_one(c, vm.ref, ["config.hardware.device"]).get("config.hardware.device")
        ctrl = next(d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController))
        ctrl.sharedBus = "physicalSharing"
        return vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=ctrl)])

    _reconfigure(lab, "erp-app", multi_writer)
    _reconfigure(lab, "erp-web", shared_bus)
    _reconfigure(lab, "erp-db", lambda vm: vim.vm.ConfigSpec(annotation="Primary Domain Controller for corp.example"))
    rc = main(["validate", "erp", "--config", str(lab.config_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    assert "VPG erp: VM erp-app: may not be protected: Hard disk 1 is a multi-writer disk" in lines
    assert ("VPG erp: VM erp-web: may not be protected: Hard disk 1 is on a SCSI controller with a shared bus "
            "(cluster member)") in lines
    assert ("VPG erp: VM erp-db: may not be protected: marked as an Active Directory domain controller "
            "(they replicate natively)") in lines


def test_domain_controller_by_custom_attribute(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    cfg = fresh_lab.config
    with connect(cfg.sites["siteA"]) as c:
        cfm = c.content.customFieldsManager
        field = c.call("custom field", cfm.AddCustomFieldDef, name="vmrep.role", moType=vim.VirtualMachine)
        vm = Inventory(c).vm("files-01")
        c.call("VM files-01", cfm.SetField, entity=vm.ref, key=field.key, value="Domain-Controller")
    problems = [p.line() for p in validate(cfg, ["files"])]
    assert problems == ["VPG files: VM files-01: may not be protected: marked as an Active Directory domain "
                        "controller (they replicate natively)"]


def test_domain_controller_by_tag(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    from vmrep.vsphere.tags import Tags

    cfg = fresh_lab.config
    with connect(cfg.sites["siteA"]) as c:
        tags = Tags(c)
        tag = tags.ensure_tag("roles", "domain-controller")
        tags.attach(tag, Inventory(c).vm("erp-app").ref)
        assert tags.of_vms([Inventory(c).vm("erp-app").ref]) == {Inventory(c).vm("erp-app").ref._moId:
                                                                  {"domain-controller"}}
    problems = [p.line() for p in validate(cfg, ["erp"])]
    assert problems == ["VPG erp: VM erp-app: may not be protected: marked as an Active Directory domain "
                        "controller (they replicate natively)"]
