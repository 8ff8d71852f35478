"""What a reverse VPG's pre-seed saves, measured where it can show.

The lab's reverse protection syncs into the journal that already holds the forward VPG's
blocks, so deduplication alone makes it store nothing, pre-seed or not. To see what the
pre-seed does, the reverse VPG's sync step runs again into a fresh journal (and state
database) of its own, once with the pre-seed copies and once without: what the second
run stores from the protected site is what the pre-seed saved.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from vmrep.recovery import steps
from vmrep.replication import engine
from vmrep.runtime import forget_runtime, get_runtime


def _fresh_config(config_path: Path, work: Path, label: str) -> Path:
    data = copy.deepcopy(yaml.safe_load(config_path.read_text()))
    (work / label).mkdir(parents=True, exist_ok=True)
    data["journal"] = {**data.get("journal", {}), "path": str(work / label / "journal")}
    data["database_url"] = f"sqlite:///{work / label / 'state.db'}"
    # next to the original, so that the generated reverse VPG (vmrep.d/) is part of it
    out = config_path.with_name(f"vmrep-fresh-{label}.yaml")
    out.write_text(yaml.safe_dump(data))
    return out


def stored_from_protected_site(config_path: Path, work: Path, vpg: str, *, preseed: bool) -> dict[str, Any]:
    """Run the reverse-sync step of every VM of `vpg` into a fresh journal; nothing is committed."""
    cfg = _fresh_config(config_path, work, "with" if preseed else "without")
    rt = get_runtime(cfg)
    try:
        target = rt.config.vpg(vpg)
        op = rt.store.start_operation(vpg, "reverse_protect", "preseed-check", {}, None)
        stored = read = 0
        seeded: list[str] = []
        try:
            for vm in target.vms:
                out = steps.reverse_sync_vm(str(cfg), vpg, op, vm.name, dict(vm.preseed) if preseed else {})
                stored += out["bytes_stored"]
                read += out["bytes_read"]
                seeded += [f"{vm.name}/{d}" for d in out["preseeded_disks"]]
        finally:
            engine.close_writer(rt, vpg, commit=False)
        return {"bytes_stored": stored, "bytes_read": read, "preseeded_disks": seeded}
    finally:
        forget_runtime(cfg)
