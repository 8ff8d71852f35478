"""Operations on one virtual machine, as govmomi's `object.VirtualMachine`: snapshots,
power, create, destroy, reconfigure, register.

Each function is one vSphere call (through `Client.call`, so retried on transient
faults) and, for a task, its wait; `name` is the VM's name for error lines ("VM x: what").
Idempotence (look before acting) belongs to the callers, which know what a retry may
find: these functions only say how a call is made, once.
"""

from __future__ import annotations

from typing import Any

from pyVmomi import vim

from vmrep.vsphere.connection import Client
from vmrep.vsphere.property import retrieve_one
from vmrep.vsphere.task import run_task, wait_for_task

# -- snapshots ---------------------------------------------------------------------


def create_snapshot(client: Client, name: str, ref: Any, snapshot: str, what: str, *,
                    description: str = "", memory: bool = False, quiesce: bool = False) -> Any:
    """Take a snapshot named `snapshot`; returns its reference. `what` says why, for errors."""
    return run_task(client, f"VM {name}: {what}", ref.CreateSnapshot_Task, name=snapshot,
                    description=description, memory=memory, quiesce=quiesce)


def remove_snapshot(client: Client, name: str, snap: Any, what: str, *, children: bool = False) -> None:
    """Remove one snapshot (never RemoveAllSnapshots: the user's own snapshots stay)."""
    run_task(client, f"VM {name}: {what}", snap.RemoveSnapshot_Task, removeChildren=children)


def revert_to_snapshot(client: Client, name: str, snap: Any, what: str = "revert to snapshot") -> None:
    run_task(client, f"VM {name}: {what}", snap.RevertToSnapshot_Task)


def snapshots(tree: Any) -> list[tuple[str, Any]]:
    """(name, snapshot reference) of every snapshot in a VM's `snapshot` property (a
    vim.vm.SnapshotInfo, or None for a VM without snapshots)."""
    out: list[tuple[str, Any]] = []
    stack = list(getattr(tree, "rootSnapshotList", None) or [])
    while stack:
        node = stack.pop()
        out.append((node.name, node.snapshot))
        stack.extend(node.childSnapshotList or [])
    return out


def find_snapshots(tree: Any, snapshot: str) -> list[Any]:
    """References of the snapshots named `snapshot` (names are not unique in vSphere)."""
    return [ref for n, ref in snapshots(tree) if n == snapshot]


# -- power -------------------------------------------------------------------------


def power_state(client: Client, ref: Any) -> str:
    """'poweredOn', 'poweredOff', 'suspended', or 'unknown' when unset."""
    return str(retrieve_one(client, ref, ["runtime.powerState"]).get("runtime.powerState") or "unknown")


def power_on(client: Client, name: str, ref: Any) -> None:
    run_task(client, f"VM {name}: power on", ref.PowerOnVM_Task)


def power_off(client: Client, name: str, ref: Any) -> None:
    run_task(client, f"VM {name}: power off", ref.PowerOffVM_Task)


def shutdown_guest(client: Client, name: str, ref: Any) -> None:
    """Ask VMware Tools to shut the guest down; returns at once (not a task: the caller
    waits for the power state)."""
    client.call(f"VM {name}", ref.ShutdownGuest, method_name="ShutdownGuest")


# -- life cycle --------------------------------------------------------------------


def create(client: Client, name: str, folder: Any, spec: Any, pool: Any, host: Any = None) -> Any:
    """CreateVM in `folder` on `pool` (and `host`); returns the new VM's reference."""
    return run_task(client, f"VM {name}", folder.CreateVM_Task, spec, pool, host)


def start_create(folder: Any, spec: Any, pool: Any, host: Any = None) -> Any:
    """The CreateVM task, not waited for: for a caller that looks for an earlier try's VM
    and starts the task within one retried call (then `wait_created`)."""
    return folder.CreateVM_Task(spec, pool, host)


def wait_created(client: Client, name: str, task: Any) -> Any:
    """The VM of a CreateVM task started by the caller (which looked for an earlier
    try's VM within the same retried call)."""
    return wait_for_task(client, task, f"VM {name}: create")


def destroy(client: Client, name: str, ref: Any) -> None:
    """Destroy (vSphere deletes the VM's files and attached disks with it)."""
    run_task(client, f"VM {name}: destroy", ref.Destroy_Task)


def unregister(client: Client, name: str, ref: Any) -> None:
    """Remove from the inventory, keeping the files."""
    client.call(f"VM {name}", ref.UnregisterVM, method_name="UnregisterVM")


def reconfigure(client: Client, name: str, ref: Any, spec: Any, what: str = "reconfigure") -> None:
    run_task(client, f"VM {name}: {what}", ref.ReconfigVM_Task, spec)


def set_extra_config(client: Client, name: str, ref: Any, values: dict[str, str]) -> None:
    """Write `config.extraConfig` keys (vmrep's markers)."""
    spec = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=k, value=v) for k, v in values.items()])
    reconfigure(client, name, ref, spec)


def customize(client: Client, name: str, ref: Any, spec: Any) -> None:
    """Guest customization (re-IP, hostname), applied at the next power-on."""
    run_task(client, f"VM {name}: guest customization", ref.CustomizeVM_Task, spec)
