"""What may not be protected, and why.

Device-level reasons are read from the VM's devices (RDM, multi-writer, shared SCSI
bus). A domain controller is a role vSphere cannot see, so it is read from a tag, a
custom attribute or the VM's notes, as configured in `domain_controller_marker`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmrep.config import DomainControllerMarker
from vmrep.vsphere.inventory import VMInfo


@dataclass(frozen=True)
class Exclusion:
    vm: str
    code: str  # rdm | multi_writer | shared_bus | domain_controller
    reason: str

    def line(self) -> str:
        return f"VM {self.vm}: may not be protected: {self.reason}"


def exclusions(vm: VMInfo, marker: DomainControllerMarker, tags: set[str] | None = None) -> list[Exclusion]:
    out: list[Exclusion] = []
    for d in vm.disks:
        if d.rdm:
            out.append(Exclusion(vm.name, "rdm", f"{d.label} is a raw device mapping (RDM)"))
        if d.multi_writer:
            out.append(Exclusion(vm.name, "multi_writer", f"{d.label} is a multi-writer disk"))
        if d.shared_bus:
            out.append(Exclusion(
                vm.name, "shared_bus",
                f"{d.label} is on a SCSI controller with a shared bus (cluster member)",
            ))
    if is_domain_controller(vm, marker, tags or set()):
        out.append(Exclusion(
            vm.name, "domain_controller",
            "marked as an Active Directory domain controller (they replicate natively)",
        ))
    return out


def is_domain_controller(vm: VMInfo, marker: DomainControllerMarker, tags: set[str]) -> bool:
    if marker.tag and marker.tag in tags:
        return True
    if marker.custom_attribute:
        value = vm.custom.get(marker.custom_attribute)
        if value is not None and value.strip().lower() == marker.custom_attribute_value.lower():
            return True
    if marker.notes_pattern and vm.notes and re.search(marker.notes_pattern, vm.notes):
        return True
    return False
