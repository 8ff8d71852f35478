"""The layer contract, read from the source: every import statement of every module
(top-level, in functions, under TYPE_CHECKING alike) is checked against the layers.

    engine       vmrep.* except vmrep.cli       imports no Prefect, nothing above it
    reports      reports.*                      the engine
    tasks        tasks.*                        engine, reports
    flows        flows.*                        engine, reports, tasks
    deployments  deployments.*                  engine, reports, tasks, flows, lab
    lab          lab.*                          the engine (beside the control plane)
    cli          vmrep.cli.*                    anything but deployments.demo

Nothing imports the CLI but the CLI itself (and the `vmrep` console entry of
pyproject.toml). A second check imports the whole engine in a fresh interpreter and
looks for Prefect in sys.modules: an import the source does not spell out (importlib,
a dependency that pulls Prefect in) fails there.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vmrep", "reports", "tasks", "flows", "deployments", "lab")

MAY_IMPORT: dict[str, set[str]] = {
    "engine": {"engine"},
    "reports": {"engine", "reports"},
    "tasks": {"engine", "reports", "tasks"},
    "flows": {"engine", "reports", "tasks", "flows"},
    "deployments": {"engine", "reports", "tasks", "flows", "deployments", "lab"},
    "lab": {"engine", "lab"},
    "cli": {"engine", "reports", "tasks", "flows", "deployments", "lab", "cli"},
}
# Modules a layer may not import although their layer is allowed: the demo's internals
# are no API for the CLI.
NOT_FOR: dict[str, tuple[str, ...]] = {"cli": ("deployments.demo",)}
# External packages a layer may not import: the engine runs without Prefect.
NO_EXTERNAL: dict[str, tuple[str, ...]] = {"engine": ("prefect", "prefect_email")}


def layer_of(module: str) -> str | None:
    """The layer of a first-party module, None for anything else."""
    top = module.split(".")[0]
    if top == "vmrep":
        return "cli" if module == "vmrep.cli" or module.startswith("vmrep.cli.") else "engine"
    return top if top in PACKAGES else None


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the layered packages under `root`."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    importer: str
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported} ({self.rule})"


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import in the file. `from a import b` counts as a.b when
    a.b is a module of ours (a submodule import), else as a."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                out.append((node.lineno, sub if sub in known else target))
    return sorted(set(out))  # `from a import b, c` is one import of a


def violations(root: Path) -> list[Violation]:
    mods = modules(root)
    known = set(mods)
    found = []
    for module, path in mods.items():
        layer = layer_of(module)
        assert layer is not None
        rel = str(path.relative_to(root))
        for line, imported in imports_of(module, path, known):
            top = imported.split(".")[0]
            if top in NO_EXTERNAL.get(layer, ()):
                found.append(Violation(rel, line, module, imported, f"the {layer} imports no {top}"))
                continue
            target = layer_of(imported)
            if target is None:
                continue  # the standard library or a dependency
            if target not in MAY_IMPORT[layer]:
                found.append(Violation(rel, line, module, imported, f"{layer} may not import {target}"))
            elif any(imported == m or imported.startswith(m + ".") for m in NOT_FOR.get(layer, ())):
                found.append(Violation(rel, line, module, imported, f"{layer} may not import {imported}"))
    return found


def test_the_code_base_keeps_its_layers() -> None:
    found = violations(ROOT)
    assert not found, "layer contract broken:\n" + "\n".join(map(str, found))


def task_definitions(path: Path) -> list[str]:
    """Functions of the file decorated as Prefect tasks (`@task`, `@task(...)`, `@prefect.task`)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
                if name == "task":
                    out.append(f"{path.name}:{node.lineno} {node.name}")
    return out


def test_flows_define_no_tasks() -> None:
    found = [d for path in sorted((ROOT / "flows").glob("*.py")) for d in task_definitions(path)]
    assert not found, "tasks belong in tasks/: " + ", ".join(found)


def test_a_task_in_a_flow_is_found(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("from prefect import task\nimport prefect\n\n@task(name='a')\ndef a(): ...\n\n"
                 "@prefect.task\nasync def b(): ...\n\ndef c(): ...\n")
    assert task_definitions(f) == ["x.py:5 a", "x.py:8 b"]  # the line of the def


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name in ("vmrep", "vmrep/cli", "reports", "tasks", "flows", "deployments", "lab"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").touch()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(("file", "text", "rule"), [
    ("vmrep/health.py", "import prefect\n", "the engine imports no prefect"),
    ("vmrep/secrets.py", "def f():\n    from prefect.blocks.system import Secret\n", "the engine imports no prefect"),
    ("vmrep/monitor.py", "from flows import monitor\n", "engine may not import flows"),
    ("vmrep/x.py", "from vmrep.cli import report\n", "engine may not import cli"),
    ("tasks/recovery.py", "from flows._common import wait_all\n", "tasks may not import flows"),
    ("flows/reports.py", "from vmrep.cli.report import parse_period\n", "flows may not import cli"),
    ("flows/x.py", "from deployments import serve\n", "flows may not import deployments"),
    ("reports/x.py", "from tasks import reporting\n", "reports may not import tasks"),
    ("deployments/demo.py", "from vmrep.cli.monitor import status_rows\n", "deployments may not import cli"),
    ("vmrep/cli/x.py", "from deployments import demo\n", "cli may not import deployments.demo"),
    ("lab/x.py", "from flows import monitor\n", "lab may not import flows"),
    ("vmrep/y.py", "from .cli import report\n", "engine may not import cli"),
])
def test_a_broken_layer_is_found(tmp_path: Path, file: str, text: str, rule: str) -> None:
    extra = {"vmrep/cli/report.py": "", "vmrep/cli/monitor.py": "", "flows/_common.py": "",
             "flows/monitor.py": "", "deployments/demo.py": "", "deployments/serve.py": "",
             "tasks/reporting.py": ""}
    root = _tree(tmp_path, {**extra, file: text})
    found = violations(root)
    assert [v.rule for v in found] == [rule], found
    assert found[0].path == file


def test_allowed_imports_are_not_flagged(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "vmrep/cli/x.py": "import prefect\nfrom flows import monitor\nfrom deployments import server\nimport lab\n",
        "deployments/server.py": "", "deployments/x.py": "from lab import manage\nfrom flows import monitor\n",
        "flows/monitor.py": "from tasks import monitoring\nfrom reports import period\n",
        "tasks/monitoring.py": "from prefect import task\nfrom vmrep import health\n",
        "reports/period.py": "from vmrep.stamps import utcnow\n", "lab/manage.py": "from vmrep import config\n",
    })
    assert violations(root) == []


def test_the_engine_loads_without_prefect() -> None:
    engine = sorted(m for m in modules(ROOT) if layer_of(m) == "engine" and "migrations" not in m)
    code = (
        "import importlib, sys\n"
        f"for m in {engine!r}:\n"
        "    importlib.import_module(m)\n"
        "from vmrep.errors import SecretError\n"
        "from vmrep.secrets import resolve_secret\n"
        "try:\n"
        "    resolve_secret('prefect_secret:smtp', 'notifications.password')\n"
        "except SecretError as exc:\n"
        "    print('refused:', exc)\n"
        "print('loaded:', sorted({n.split('.')[0] for n in sys.modules} & {'prefect', 'prefect_email'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "loaded: []" in out.stdout, out.stdout
    # Without the control plane a Prefect reference is refused in one line that names it.
    assert "refused: notifications.password (prefect_secret:smtp): Prefect Secret blocks are read by the " \
           "control plane" in out.stdout, out.stdout
