"""The docs say what the code does: every `vmrep.yaml` setting is in
docs/configuration.md with its real default and every key there exists, and every
`vmrep ...` command and flag the pages name exists (and every command is named somewhere).

Cheap by design (no lab, no server): pydantic's field table and typer's command tree.
"""

from __future__ import annotations

import functools
import re
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import typer
from pydantic import BaseModel

from vmrep import config as C

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DOC = ROOT / "docs" / "configuration.md"
# The pages whose `vmrep ...` commands are checked (the pages other helpers own are
# checked for the reverse direction only: every command must be named somewhere).
CHECKED_PAGES = ["README.md", "docs/concepts.md", "docs/configuration.md", "docs/metrics.md",
                 "docs/real-vcenter.md", "docs/journal-format.md", "docs/journal-api.md",
                 "docs/ransomware.md", "docs/architecture.md", "bench/README.md",
                 "lab/launcher/README.md"]
ALL_PAGES = CHECKED_PAGES + ["docs/operations.md", "docs/recovery.md", "docs/journal-service.md"]

# Fields that are not settings a user writes.
NOT_SETTINGS = {("Site", "name"), ("Config", "source")}


def _models(model: type[BaseModel], seen: dict[str, type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """Every model reachable from `model` through its fields (lists, dicts, optionals)."""
    seen[model.__name__] = model
    for f in model.model_fields.values():
        stack = [f.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                if t.__name__ not in seen:
                    _models(t, seen)
            elif get_origin(t) is not None:
                stack.extend(get_args(t))
    return seen


MODELS = _models(C.Config, {})


def _default_token(value: Any) -> str | None:
    """How the doc writes a default (None: nothing to check: required, none, empty)."""
    if value is None or value == [] or value == {} or isinstance(value, BaseModel):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value // (1024 * 1024)} MiB"
    return str(value)


def _settings() -> list[tuple[str, str, Any]]:
    out = []
    for mname, model in MODELS.items():
        for fname, f in model.model_fields.items():
            if (mname, fname) in NOT_SETTINGS:
                continue
            out.append((mname, f.alias or fname, None if f.is_required() else f.get_default()))
    return out


def test_every_setting_is_in_configuration_md_with_its_default() -> None:
    doc = CONFIG_DOC.read_text()
    missing, wrong = [], []
    for mname, key, default in _settings():
        # `key` or `a.b.key`, then within the same line (and not too far) its default
        # (`key[]` for a list, `key:…` for a reference form such as `env:VAR`)
        mentions = list(re.finditer(rf"`\{{?(?:[\w<>\[\].]+\.)?{re.escape(key)}(?:\[\])?[`:]", doc))
        if not mentions:
            missing.append(f"{mname}.{key}")
            continue
        token = _default_token(default)
        if token is None:
            continue
        found = False
        for m in mentions:
            line_end = doc.find("\n", m.end())
            if token in doc[m.end(): min(line_end, m.end() + 120)]:
                found = True
                break
        if not found:
            wrong.append(f"{mname}.{key} (default {token})")
    assert not missing, f"settings not in docs/configuration.md: {missing}"
    assert not wrong, f"settings whose default docs/configuration.md does not give: {wrong}"


def _resolve(model: type[BaseModel], dotted: str) -> bool:
    """Whether `a.b.c` is a field path of `model` (through nested models)."""
    for part in dotted.split("."):
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        if part not in fields:
            return False
        sub = [t for t in _flatten(fields[part].annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if sub:
            model = sub[0]
    return True


def _flatten(t: Any) -> list[Any]:
    out, stack = [], [t]
    while stack:
        x = stack.pop()
        out.append(x)
        stack.extend(get_args(x))
    return out


def test_every_key_in_configuration_md_exists() -> None:
    """The first column of each table names real keys (a renamed field fails here)."""
    section_model: dict[str, type[BaseModel]] = {"Top level": C.Config, "Site": C.Site, "VPG": C.VPG}
    model = None
    unknown = []
    for line in CONFIG_DOC.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:]
            model = next((m for t, m in section_model.items() if title.startswith(t)), None)
            continue
        if model is None or not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        for key in re.findall(r"`([\w.]+)`", first.split(":")[0]):
            if not _resolve(model, key):
                unknown.append(f"{model.__name__}: {key}")
    assert not unknown, f"keys in docs/configuration.md that the config does not have: {unknown}"


# --- commands and flags ---------------------------------------------------------------

@functools.cache
def _tree() -> dict[str, Any]:
    from vmrep.cli import app

    root = typer.main.get_command(app)
    out: dict[str, Any] = {}

    def walk(cmd: Any, path: str) -> None:
        out[path] = cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(root, "")
    return out


def _options(cmd: Any) -> set[str]:
    opts = {"--help"}
    for p in cmd.params:
        opts.update(getattr(p, "opts", []))
        opts.update(getattr(p, "secondary_opts", []))
    return opts


CODE = re.compile(r"```[^\n]*\n(.*?)```|`([^`\n]+)`", re.S)
INVOCATION = re.compile(r"(?<![\w./'\"-])vmrep((?: [a-z][a-z-]*)+)([^|#;\n]*)")


def _invocations(text: str) -> list[tuple[list[str], list[str]]]:
    """(words, flags) of every `vmrep ...` in a code block or inline code span."""
    out = []
    for m in CODE.finditer(text):
        if m.group(1) is not None:  # a block: its comments are prose
            code = "\n".join(line.split(" #")[0] for line in m.group(1).splitlines())
        else:
            code = m.group(2)
        # several commands on a line: split before each `vmrep `
        for part in re.split(r"(?=(?<![\w./'\"-])vmrep )", code):
            for inv in INVOCATION.finditer(part):
                words = inv.group(1).split()
                rest = part[inv.end(1):]
                flags = re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest.split("\n")[0])
                out.append((words, flags))
    return out


@pytest.mark.parametrize("page", CHECKED_PAGES)
def test_commands_and_flags_named_in_the_docs_exist(page: str) -> None:
    tree = _tree()
    bad = []
    for words, flags in _invocations((ROOT / page).read_text()):
        # the longest prefix of the words that is a command; the rest are arguments
        path = ""
        for w in words:
            candidate = f"{path} {w}".strip()
            if candidate in tree:
                path = candidate
            else:
                break
        if not path:
            bad.append(f"vmrep {' '.join(words)}: no such command")
            continue
        cmd = tree[path]
        if getattr(cmd, "commands", None) and words[len(path.split()):]:
            bad.append(f"vmrep {' '.join(words)}: {path!r} has no sub-command {words[len(path.split())]!r}")
            continue
        unknown = [f for f in flags if f not in _options(cmd)]
        if unknown:
            bad.append(f"vmrep {path}: no option {', '.join(unknown)}")
    assert not bad, f"{page}: " + "; ".join(sorted(set(bad)))


def test_every_command_is_named_in_some_page() -> None:
    text = "\n".join((ROOT / p).read_text() for p in ALL_PAGES)
    named = {" ".join(w[:n]) for w, _ in _invocations(text) for n in range(1, len(w) + 1)}
    leaves = [p for p, c in _tree().items() if p and not getattr(c, "commands", None)]
    unnamed = sorted(p for p in leaves if p not in named)
    assert not unnamed, f"commands no page names: {unnamed}"


# --- metrics ----------------------------------------------------------------------------

def test_every_metric_is_in_metrics_md_with_its_labels_and_no_other() -> None:
    from vmrep.metrics import METRICS

    doc = (ROOT / "docs" / "metrics.md").read_text()
    rows = {m.group(1): tuple(x.strip() for x in m.group(2).split(",") if x.strip())
            for m in re.finditer(r"^\| `(vmrep_[a-z_]+)` \|([^|]*)\|", doc, re.M)}
    assert rows == {name: tuple(labels) for name, labels in METRICS.items()}
