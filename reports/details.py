"""Step details in words, for the reports an auditor reads.

The recovery code records each step's detail as a dictionary (vmrep/recovery/steps.py,
vmrep/recovery/operations.py); the steps CSV keeps it whole as JSON. The HTML and text
reports show `describe(step, detail)` instead: a sentence per step kind, with units for
bytes and seconds. Keys a sentence does not use (or a step kind without a sentence) are
listed as "key: value" in words too, so no dictionary or JSON ever reaches the page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reports.render import fmt_bytes, fmt_duration, missing

VALUE_MAX = 300  # characters of one description; the steps CSV has the whole detail


def size(n: Any) -> str:
    """Bytes with a binary unit, without a useless `.0`: 25165824 -> '24 MiB'."""
    return fmt_bytes(n).replace(".0 ", " ")


def secs(s: Any) -> str:
    """Seconds as a duration; under ten seconds with two significant digits (0.14 s)."""
    if missing(s):
        return "—"
    v = float(s)
    if abs(v) < 10 and v != int(v):
        return f"{v:.2g} s" if abs(v) < 1 else f"{v:.1f} s"
    return fmt_duration(v)


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _names(items: Any) -> str:
    return ", ".join(str(x) for x in items) if isinstance(items, (list, tuple)) else str(items)


def _key_words(key: str) -> str:
    return str(key).replace("_", " ")


def value_words(key: str, value: Any) -> str:
    """One value in words: units for bytes and seconds, lists joined, dicts as key value."""
    k = str(key).lower()
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        inner = "; ".join(f"{_key_words(k2)} {value_words(k2, v2)}" for k2, v2 in value.items())
        return f"({inner})" if inner else "none"
    if isinstance(value, (list, tuple)):
        if not value:
            return "none"
        return ", ".join(value_words(key, x) for x in value)
    if value is None or missing(value):
        return "—"
    if isinstance(value, (int, float)):
        if "bytes" in k or k.endswith("_size") or k == "size":
            return size(value)
        if "seconds" in k or k == "seconds":
            return secs(value)
    return str(value)


def key_values(detail: dict[str, Any]) -> str:
    """The fallback: 'key: value, …' in words."""
    return ", ".join(f"{_key_words(k)}: {value_words(k, v)}" for k, v in detail.items())


# ---- one sentence per step kind; each takes the detail (a copy) and pops what it says


def _plan(d: dict[str, Any]) -> str:
    plan = d.pop("plan", None)
    cp = d.pop("checkpoint", None)
    hw = d.pop("hardware_from", None)
    parts = []
    if isinstance(plan, dict):
        vms = plan.get("vms") or []
        names = [str(v.get("source", "?")) for v in vms if isinstance(v, dict)]
        parts.append(f"planned the recovery of {plural(len(names), 'VM')}"
                     + (f" ({', '.join(names)})" if names else "")
                     + (f" at site {plan['site']}" if plan.get("site") else "")
                     + (f" into folder {plan['folder']}" if plan.get("folder") else ""))
        groups = [g.get("name") for g in plan.get("groups") or [] if isinstance(g, dict) and g.get("name")]
        if groups:
            parts.append(f"boot order {' then '.join(str(g) for g in groups)}")
        cp = cp or plan.get("checkpoint_id")
    else:
        parts.append("planned the recovery")
    if cp:
        parts.append(f"from checkpoint {cp}")
    if hw:
        parts.append(f"hardware taken from {hw}")
    return ", ".join(parts)


def _cleanup_leftovers(d: dict[str, Any]) -> str:
    vms = d.pop("removed_vms", None) or []
    folders = d.pop("removed_folders", None) or []
    if not vms and not folders:
        return ""  # the skip reason says so
    out = []
    if vms:
        out.append(f"removed {plural(len(vms), 'leftover VM')} ({_names(vms)})")
    if folders:
        out.append(f"deleted {plural(len(folders), 'leftover folder')} ({_names(folders)})")
    return " and ".join(out)


def _script(d: dict[str, Any]) -> str:
    cmd = d.pop("command", None)
    code = d.pop("exit_code", None)
    took = d.pop("seconds", None)
    output = d.pop("output", None)
    s = f"ran {cmd}" if cmd else "ran the script"
    if code is not None:
        s += f": exit code {code}"
    if took is not None:
        s += f" in {secs(took)}"
    if output:
        last = str(output).strip().splitlines()[-1] if str(output).strip() else ""
        if last:
            s += f"; last output line: {last}"
    return s


def _removed_folders(d: dict[str, Any]) -> str:
    removed = d.pop("removed", None) or []
    return f"deleted {plural(len(removed), 'folder')} ({_names(removed)})" if removed else ""


def _final_checkpoint(d: dict[str, Any]) -> str:
    cp = d.pop("checkpoint", None)
    blocks = d.pop("blocks_changed", None)
    s = f"took the final checkpoint {cp}" if cp else "took the final checkpoint"
    if blocks is not None:
        s += f" ({plural(int(blocks), 'block')} changed since the last one)"
    return s


def _checkpoint(d: dict[str, Any]) -> str:
    cp = d.pop("checkpoint", None)
    return f"committed checkpoint {cp} of the reverse VPG" if cp else "committed the reverse VPG's checkpoint"


def _paused(d: dict[str, Any]) -> str:
    if "was_paused" not in d:
        return ""
    return "replication was paused before" if d.pop("was_paused") else "replication was running before"


def _write_disks(d: dict[str, Any]) -> str:
    disks = d.pop("disks", None) or []
    total = d.pop("bytes_written", None)
    parts = []
    for x in disks:
        if not isinstance(x, dict):
            parts.append(str(x))
            continue
        name = x.get("disk", "a disk")
        if x.get("skipped"):
            p = f"{name} was written by an earlier try"
        else:
            p = f"wrote {size(x.get('bytes_written', 0))} to {name}"
            if x.get("seconds") is not None:
                p += f" in {secs(x['seconds'])}"
        bad = x.get("bad_block_count") or 0
        if bad:
            first = x.get("bad_blocks") or []
            p += f" ({plural(int(bad), 'unreadable block')}" + (f", first {first[0]}" if first else "") + ")"
        parts.append(p)
    if len(disks) > 1 and total is not None:
        parts.append(f"{size(total)} in all")
    if not disks:
        parts.append(f"wrote {size(total)}" if total is not None else "no disk to write")
    return "; ".join(parts)


def _create_vm(d: dict[str, Any]) -> str:
    name = d.pop("name", None) or "the VM"
    moref = d.pop("moref", None)
    created = d.pop("created", None)
    ref = f" ({moref})" if moref else ""
    return f"VM {name}{ref} existed already" if created is False else f"created VM {name}{ref}"


def _customize(d: dict[str, Any]) -> str:
    ips = d.pop("ips", None) or []
    return f"set the IP address{'es' if len(ips) > 1 else ''} {_names(ips)} by guest customization" if ips else ""


def _power_on(d: dict[str, Any]) -> str:
    group = d.pop("group", None)
    return f"powered on in boot group {group}" if group else "powered on"


def _verify(d: dict[str, Any]) -> str:
    guest = d.pop("guest", None)
    expected = d.pop("expected_ips", None) or []
    disks = d.pop("disks", None) or []
    problems = d.pop("problems", None) or []
    ok = d.pop("ok", None)
    parts = []
    if isinstance(guest, dict):
        g = [f"power {guest.get('power') or 'unknown'}", f"VMware Tools {guest.get('tools') or 'not reported'}",
             f"heartbeat {guest.get('heartbeat') or 'not reported'}"]
        ips = guest.get("ips") or ([guest["ip"]] if guest.get("ip") else [])
        g.append(f"IP {_names(ips)}" if ips else "no IP reported")
        if expected:
            g[-1] += f" (expected {_names(expected)})"
        parts.append("guest: " + ", ".join(g))
    for x in disks:
        if not isinstance(x, dict):
            parts.append(str(x))
            continue
        name = x.get("disk", "a disk")
        blocks = int(x.get("blocks") or 0)
        bad = int(x.get("mismatch_count") or 0)
        took = f" (compared in {secs(x['seconds'])})" if x.get("seconds") is not None else ""
        if bad:
            p = f"{name}: {bad} of {plural(blocks, 'block')} differ from the checkpoint{took}"
        else:
            p = f"{name}: all {plural(blocks, 'block')} equal to the checkpoint{took}"
        if x.get("size_ok") is False:
            p += ", size differs"
        parts.append(p)
    if problems:
        parts.append("problems: " + "; ".join(str(p) for p in problems))
    elif ok:
        parts.append("verified")
    return "; ".join(parts)


def _removed_vms(d: dict[str, Any]) -> str:
    removed = d.pop("removed", None) or []
    return f"removed {plural(len(removed), 'VM')} ({_names(removed)})" if removed else ""


def _shutdown(d: dict[str, Any]) -> str:
    was = d.pop("was", None)
    policy = d.pop("policy", None)
    action = d.pop("action", None)
    off = d.pop("powered_off", None)
    s = f"the source VM was {was}" if was else "the source VM"
    if policy:
        s += f"; shutdown policy {policy}"
    if action and action != "none":
        s += f": {action}"
    if off is not None:
        s += ", now powered off" if off else ", not powered off"
    return s


def _remove_source(d: dict[str, Any]) -> str:
    uuid = d.pop("uuid", None)
    return f"unregistered the source VM (UUID {uuid}); its files stay" if uuid else "unregistered the source VM"


def _reverse_sync(d: dict[str, Any]) -> str:
    d.pop("vm", None)
    read = d.pop("bytes_read", None)
    stored = d.pop("bytes_stored", None)
    blocks = d.pop("blocks_changed", None)
    seeded = d.pop("preseeded_disks", None) or []
    parts = []
    if read is not None:
        parts.append(f"read {size(read)}")
    if stored is not None:
        parts.append(f"stored {size(stored)}")
    if blocks is not None:
        parts.append(f"{plural(int(blocks), 'block')} changed")
    s = "synced for reverse protection: " + ", ".join(parts) if parts else "synced for reverse protection"
    if seeded:
        s += f"; pre-seeded from the original disks {_names(seeded)}"
    fallbacks = d.pop("fallbacks", None) or {}
    if fallbacks:
        s += "; read in full: " + "; ".join(f"disk {k}: {v}" for k, v in sorted(fallbacks.items()))
    return s


def _change_baseline(d: dict[str, Any]) -> str:
    cp = d.pop("checkpoint", None)
    disks = d.pop("disks", None) or {}
    why = d.pop("fallback", None)
    if why:
        return f"no change-tracking baseline: {why}"
    s = f"change tracking on; baseline change ids of {plural(len(disks), 'disk')}"
    return s + (f" at checkpoint {cp}" if cp else "")


LIVE_KINDS = ("failover", "move", "commit", "rollback")


def live_operation_words(op: dict[str, Any]) -> str:
    """The warnings and notes of a live operation (failover, move, commit, rollback) in
    words: what its record says went short of plan (a failover's notes are its warnings,
    e.g. "protected site unreachable: source VMs not shut down"), its error, a missed RTO."""
    parts = []
    notes = op.get("notes")
    if notes is not None and not missing(notes) and str(notes):
        parts.append(str(notes))
    err = op.get("error")
    if err is not None and not missing(err) and str(err):
        parts.append(f"error: {err}")
    rto, target = op.get("rto_seconds"), op.get("rto_target_seconds")
    if rto is not None and target is not None and not missing(rto) and not missing(target) \
            and float(rto) > float(target):
        parts.append(f"RTO {secs(rto)} over the target {secs(target)}")
    who = op.get("started_by")
    if op.get("kind") in ("commit", "rollback") and who == "commit policy":
        parts.append("applied by the commit policy")
    return "; ".join(parts)


def _recovered(d: dict[str, Any]) -> str:
    rto = d.pop("rto_seconds", None)
    d.pop("at", None)  # the step's own start time says when
    return f"every VM recovered: RTO {secs(rto)}" if rto is not None else "every VM recovered"


def _awaiting_stop(d: dict[str, Any]) -> str:
    if "verified" not in d:
        return ""
    return "every VM verified" if d.pop("verified") else "not every VM verified"


SENTENCES: dict[str, Callable[[dict[str, Any]], str]] = {
    "plan": _plan,
    "cleanup-leftovers": _cleanup_leftovers,
    "pre-script": _script,
    "post-script": _script,
    "remove-disks": _removed_folders,
    "final-checkpoint": _final_checkpoint,
    "pause-replication": _paused,
    "resume-replication": _paused,
    "write-disks": _write_disks,
    "create-vm": _create_vm,
    "customize": _customize,
    "power-on": _power_on,
    "verify": _verify,
    "remove-vm": _removed_vms,
    "shutdown-source": _shutdown,
    "remove-source-vm": _remove_source,
    "reverse-sync": _reverse_sync,
    "change-baseline": _change_baseline,
    "reverse-checkpoint": _checkpoint,
    "recovered": _recovered,
    "awaiting-stop": _awaiting_stop,
}


def _short(text: str) -> str:
    if len(text) <= VALUE_MAX:
        return text
    return f"{text[:VALUE_MAX]}… (whole in the steps CSV)"


def describe(step: str, detail: Any) -> str:
    """The detail of one step in words ('' when there is none)."""
    if detail is None or (not isinstance(detail, (dict, list)) and missing(detail)):
        return ""
    if isinstance(detail, list):
        return _short(value_words("detail", detail))
    if not isinstance(detail, dict):
        return _short(str(detail))
    d = dict(detail)
    reason = d.pop("reason", None)  # StepHandle.skip: why the step had nothing to do
    words = []
    fn = SENTENCES.get(step)
    if fn is not None:
        try:
            said = fn(d)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError):
            said, d = "", dict(detail)  # an unexpected shape: every key in the fallback
            d.pop("reason", None)
        if said:
            words.append(said)
    if reason:
        words.insert(0, f"skipped: {reason}")
    if d:
        words.append(key_values(d))
    return _short("; ".join(words))


__all__ = ["describe", "key_values", "value_words", "size", "secs", "SENTENCES", "LIVE_KINDS",
           "live_operation_words"]
