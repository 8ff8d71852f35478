"""Names vmrep gives to what it creates at the recovery site, and the markers it leaves
on recovered VMs so that it can always find them again (docs/recovery.md).

* test VM:           ``<vm> - testing recovery``
* test scratch data: ``[<recovery datastore>] vmrep-test-<vpg>/<vm>/<disk>.vmdk``
* live VM:           ``<vm>`` (same name as the protected VM)
* live disks:        ``[<recovery datastore>] vmrep-<vpg>-<operation id[:8]>/<vm>/<disk>.vmdk``
* markers:           ``config.extraConfig`` keys ``vmrep.recovery.*`` set at CreateVM
"""

from __future__ import annotations

import re

TEST_SUFFIX = " - testing recovery"

MARK_VPG = "vmrep.recovery.vpg"
MARK_SOURCE = "vmrep.recovery.source"
MARK_OPERATION = "vmrep.recovery.operation"
MARK_KIND = "vmrep.recovery.kind"  # "test" | "live"
MARK_STATE = "vmrep.recovery.state"  # "committed" once a live recovery is committed

KIND_TEST = "test"
KIND_LIVE = "live"
STATE_COMMITTED = "committed"


def safe(name: str) -> str:
    """A path component made of [A-Za-z0-9._-] (others become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def test_vm_name(vm: str) -> str:
    return f"{vm}{TEST_SUFFIX}"


def source_of_test_name(name: str) -> str | None:
    return name[: -len(TEST_SUFFIX)] if name.endswith(TEST_SUFFIX) else None


def scratch_folder(vpg: str) -> str:
    """Datastore folder holding a test's scratch copies (one per VPG: one test at a time)."""
    return f"vmrep-test-{safe(vpg)}"


def live_folder(vpg: str, operation_id: str) -> str:
    """Datastore folder holding the disks of one live recovery (failover or move)."""
    return f"vmrep-{safe(vpg)}-{operation_id[:8]}"


def disk_descriptor(datastore: str, folder: str, vm: str, disk_id: str) -> str:
    """'[ds] folder/vm/scsi0-1.vmdk' (its flat extent is 'scsi0-1-flat.vmdk')."""
    return f"[{datastore}] {folder}/{safe(vm)}/{safe(disk_id.replace(':', '-'))}.vmdk"


def reverse_vpg_name(vpg: str) -> str:
    return f"{vpg}-reverse"


def hostname(vm: str, limit: int = 63) -> str:
    """A guest host name from a VM name (letters, digits, '-')."""
    h = re.sub(r"[^A-Za-z0-9-]", "-", vm).strip("-") or "vm"
    return h[:limit].rstrip("-") or "vm"
