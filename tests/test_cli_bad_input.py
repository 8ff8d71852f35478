"""Every `vmrep` command, given each kind of bad value it takes, ends with one line that
names the value and a non-zero exit, and has done nothing.

The commands are enumerated from the Typer app: a new command without a case here (or a
reasoned entry in NO_BAD_VALUES) fails `test_every_command_has_cases`. The kinds: a
malformed number or duration, an unknown VPG, VM, disk, checkpoint or run id, a path
that cannot be written, a missing or malformed config, and a site that refuses the login
(the lab's InvalidLogin fault on `Login`).

"Done nothing" is checked after each case: no new checkpoint, no new operation record, no
vSphere task (snapshot, VM, power) at either site, no file created in the work folder or
under VMREP_HOME. All cases run in this process against one lab (about a second each at
most: none may reach a Prefect flow, which would also print a traceback).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import typer
import yaml

from vmrep.cli import app, main
from vmrep.runtime import forget_runtime

VPG, VM, BAD_VPG = "erp", "erp-db", "no-such-vpg"

# Commands that read a config (--config) and the fewest arguments that are otherwise
# valid: each gets the missing/malformed-config cases, and those naming a VPG the
# unknown-VPG case. A command reading --config that is missing here fails the test.
MINIMAL: dict[str, list[str]] = {
    "validate": [],
    "sync": [VPG],
    "replicate": [VPG, "--cycles", "1"],
    "checkpoints": [VPG],
    "checkpoint tag": [VPG, "before upgrade"],
    "verify": [VPG],
    "restore-disk": [VPG, VM, "0", "--out", "{work}/ok.img"],
    "test": [VPG],
    "failover": [VPG, "--confirm", VPG],
    "commit": [VPG],
    "rollback": [VPG],
    "move": [VPG, "--confirm", VPG],
    "status": [],
    "alerts": [],
    "monitor": ["--once"],
    "report dr-test": [],
    "report compliance": [],
    "report emails": [],
    "lab write": [VM, "--for", "1s"],
    "exporter": ["--listen", "127.0.0.1:19496"],  # the config is read before it listens
    "journal repair-index": [],
    "journal serve": ["--port", "0"],  # the config is read before it listens
    "journal retention": [VPG],
    "ransomware status": [VPG],
    "ransomware dismiss": [VPG, "--vm", VM, "--reason", "backup job"],  # refused: nothing suspected
}
# `lab up --config` is the file it writes, not one it reads: see its path cases below.
WRITES_CONFIG = {"lab up"}

# Commands that take no value that can be wrong (each with the reason).
NO_BAD_VALUES: dict[str, str] = {
    "lab down": "takes no arguments or options",
    "lab status": "takes only --json",
    "server start": "takes only --json; the server is the one of $VMREP_HOME (tests/test_cli_server.py)",
    "server status": "takes only --json; the server is the one of $VMREP_HOME (tests/test_cli_server.py)",
    "server stop": "takes no arguments; the server is the one of $VMREP_HOME (tests/test_cli_server.py)",
}


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    names: str  # what the one stderr line must contain (the bad value), after formatting
    refuse_login: str | None = None  # the site whose Login answers InvalidLogin

    @property
    def id(self) -> str:
        prefix = f"{self.refuse_login}-refuses-login: " if self.refuse_login else ""
        return prefix + " ".join(a or "''" for a in self.argv)


def c(cmd: str, *args: str, names: str, login: str | None = None) -> Case:
    return Case(tuple(cmd.split()) + args, names, login)


EXPLICIT: list[Case] = [
    # malformed numbers and durations
    c("replicate", VPG, "--for", "1.5.0m", names="'1.5.0m'"),
    c("replicate", VPG, "--for", "soon", names="'soon'"),
    c("replicate", VPG, "--for", "0", names="--for '0'"),
    c("replicate", VPG, "--cycles", "0", names="--cycles 0"),
    c("replicate", VPG, "--cycles", "-3", names="--cycles -3"),
    c("replicate", VPG, "--cycles", "two", names="'two'"),
    c("replicate", VPG, "--cycles", "1", "--interval", "0", names="--interval 0"),
    c("replicate", VPG, "--cycles", "1", "--interval", "-5", names="--interval -5"),
    c("replicate", VPG, "--cycles", "1", "--interval", "1.5.0", names="'1.5.0'"),
    c("replicate", VPG, names="--for"),  # neither --for nor --cycles
    c("test", VPG, "--keep", "-1", names="'-1'"),
    c("test", VPG, "--keep", "ten", names="'ten'"),
    c("test", VPG, "--verify-timeout", "-1", names="'-1'"),
    c("test", "stop", VPG, "--success", "maybe", names="'maybe'"),
    c("failover", VPG, "--confirm", VPG, "--commit-after", "-1", names="'-1'"),
    c("failover", VPG, "--confirm", VPG, "--shutdown", "gently", names="'gently'"),
    c("failover", VPG, "--confirm", VPG, "--commit-policy", "later", names="'later'"),
    c("move", VPG, "--confirm", VPG, "--shutdown", "gently", names="'gently'"),
    c("move", VPG, "--confirm", VPG, "--verify-timeout", "x", names="'x'"),
    c("status", "--watch", "--interval", "0", names="--interval 0"),
    c("status", "--watch", "--json", names="--watch and --json"),
    c("status", "--watch", "--interval", "often", names="'often'"),
    c("monitor", "--once", "--interval", "0", names="--interval 0"),
    c("monitor", "--interval", "-1", names="--interval -1"),
    c("monitor", "--once", "--interval", "often", names="'often'"),
    c("report emails", "--last", "0", names="--last 0"),
    c("report emails", "--last", "-2", names="--last -2"),
    c("report emails", "--last", "many", names="'many'"),
    c("report compliance", "--since", "1.5.0d", names="'1.5.0d'"),
    c("report compliance", "--since", "0d", names="'0d'"),
    c("report compliance", "--since", "2025-13", names="'2025-13'"),
    c("report compliance", "--until", "whenever", names="'whenever'"),
    c("lab write", VM, "--for", "1.5.0m", names="'1.5.0m'"),
    c("lab write", VM, "--for", "0", names="--for '0'"),
    c("lab write", VM, "--rate", "fast", names="'fast'"),
    c("lab write", VM, "--rate", "0", names="--rate '0'"),
    c("lab write", VM, "--rate", "1.5.0MiB/s", names="'1.5.0MiB/s'"),
    c("lab write", VM, "--disk", "x", names="'x'"),
    c("lab write", VM, "--seed", "x", names="'x'"),
    c("lab write", VM, "--content", "encrypted", names="'encrypted'"),
    c("exporter", "--listen", "nonsense", names="'nonsense'"),
    c("report dr-test", "--format", "docx", names="'docx'"),
    c("report compliance", "--format", "docx", names="'docx'"),
    c("exporter", "--listen", "127.0.0.1:99999", names="'127.0.0.1:99999'"),
    c("lab up", "--boot-delay", "1.5.0s", "--config", "{work}/lab.yaml", names="'1.5.0s'"),
    c("lab up", "--boot-delay", "-1s", "--config", "{work}/lab.yaml", names="'-1s'"),
    c("status", "--config", "{work}/zero-rpo.yaml", names="vpgs[erp].rpo_target_seconds"),
    # an empty or blank tag (it used to take a new, untagged checkpoint)
    c("checkpoint tag", VPG, "", names="tag ''"),
    c("checkpoint tag", VPG, "   ", names="tag '   '"),
    c("checkpoint tag", VPG, "", "--checkpoint", "latest", names="tag ''"),
    # unknown VM, disk, checkpoint and run ids
    c("restore-disk", VPG, "no-such-vm", "0", "--out", "{work}/x.img", names="'no-such-vm'"),
    c("restore-disk", VPG, VM, "7", "--out", "{work}/x.img", names="'7'"),
    c("restore-disk", VPG, VM, "scsi9:9", "--out", "{work}/x.img", names="'scsi9:9'"),
    c("restore-disk", VPG, VM, "Hard disk 9", "--out", "{work}/x.img", names="'Hard disk 9'"),
    c("restore-disk", VPG, VM, "0", "--checkpoint", "cp-99999999", "--out", "{work}/x.img", names="'cp-99999999'"),
    c("restore-disk", VPG, VM, "0", "--checkpoint", "yesterday", "--out", "{work}/x.img", names="'yesterday'"),
    c("restore-disk", VPG, VM, "0", "--checkpoint", "2001-01-01", "--out", "{work}/x.img", names="'2001-01-01'"),
    c("verify", VPG, "--checkpoint", "cp-99999999", names="'cp-99999999'"),
    c("checkpoint tag", VPG, "x", "--checkpoint", "cp-99999999", names="'cp-99999999'"),
    c("test", VPG, "--checkpoint", "cp-99999999", names="'cp-99999999'"),
    c("test", "start", VPG, "--checkpoint", "nowhere", names="'nowhere'"),
    c("failover", VPG, "--confirm", VPG, "--checkpoint", "cp-99999999", names="'cp-99999999'"),
    c("report dr-test", "no-such-run", names="'no-such-run'"),
    c("lab write", "no-such-vm", names="'no-such-vm'"),
    c("lab site-down", "no-such-site", names="'no-such-site'"),
    c("lab site-down", "no-such-site", "--hang", names="'no-such-site'"),
    c("lab site-up", "no-such-site", names="'no-such-site'"),
    c("lab write", VM, "--disk", "7", names="--disk 7"),
    c("lab write", VM, "--disk", "-1", names="--disk -1"),
    c("report compliance", "--vpg", BAD_VPG, names=repr(BAD_VPG)),
    c("ransomware dismiss", VPG, "--vm", "no-such-vm", "--reason", "x", names="'no-such-vm'"),
    c("ransomware dismiss", VPG, "--vm", VM, "--disk", "scsi9:9", "--reason", "x", names="'scsi9:9'"),
    c("ransomware dismiss", VPG, "--vm", VM, "--reason", "  ", names="--reason '  '"),
    c("validate", VPG, BAD_VPG, names=repr(BAD_VPG)),
    c("journal retention", "--site", "siteZ", names="'siteZ'"),
    c("journal retention", "files", "--site", "siteB", names="VPG files: not recovered at site siteB"),
    # paths that cannot be written
    c("restore-disk", VPG, VM, "0", "--out", "/no/such/dir/x.img", names="/no/such/dir/x.img"),
    c("restore-disk", VPG, VM, "0", "--out", "{work}", names="{work}"),
    c("restore-disk", VPG, VM, "0", "--out", "{file}/x.img", names="{file}/x.img"),
    c("report dr-test", "--out", "{file}/r.html", names="{file}/r.html"),
    c("report compliance", "--out", "{file}/r.html", names="{file}/r.html"),
    c("report compliance", "--out", "{file}/reports", names="{file}/reports"),
    c("lab up", "--config", "/no/such/dir/vmrep.yaml", names="/no/such/dir/vmrep.yaml"),
    c("lab up", "--config", "{work}", names="{work}"),
    # a site that refuses the login: each command that needs that site
    *[c(cmd, *args, names=site, login=site) for site in ("siteA", "siteB") for cmd, args in (
        ("validate", [VPG]), ("sync", [VPG]), ("replicate", [VPG, "--cycles", "1"]), ("test", [VPG]),
        ("test start", [VPG]), ("move", [VPG, "--confirm", VPG]))],
    c("failover", VPG, "--confirm", VPG, names="siteB", login="siteB"),  # the protected site is not needed
    c("checkpoint tag", VPG, "before upgrade", names="siteA", login="siteA"),
    # (`lab write` needs no login: a guest writes through the lab's control endpoint)
]


def generated() -> list[Case]:
    """The cases every config-reading command gets: a missing or malformed config, and
    (where it names a VPG) an unknown VPG."""
    out = []
    for cmd, args in MINIMAL.items():
        for path, names in (("{work}/missing.yaml", "{work}/missing.yaml"),
                            ("{work}/not-yaml.yaml", "{work}/not-yaml.yaml"),
                            ("{work}/a-list.yaml", "{work}/a-list.yaml"),
                            ("{work}/bad-field.yaml", "journal.block_size")):
            out.append(c(cmd, *args, "--config", path, names=names))
        if VPG in args:
            out.append(c(cmd, *[BAD_VPG if a == VPG else a for a in args], names=repr(BAD_VPG)))
    return out


CASES = EXPLICIT + generated()


def command_paths(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        # a group of click's or of the click that typer >= 0.2x vendors (typer._click)
        if isinstance(getattr(cmd, "commands", None), dict):
            yield from command_paths(cmd, path + " ")
        else:
            yield path, cmd


def all_commands() -> dict[str, Any]:
    return dict(command_paths(typer.main.get_command(app)))  # type: ignore[arg-type]


def case_command(case: Case) -> str:
    for n in (2, 1):
        if " ".join(case.argv[:n]) in all_commands():
            return " ".join(case.argv[:n])
    raise AssertionError(f"case {case.id}: not a vmrep command")


def test_every_command_has_cases() -> None:
    commands = all_commands()
    covered = {case_command(k) for k in CASES}
    missing = sorted(p for p in commands if p not in covered and p not in NO_BAD_VALUES)
    assert not missing, f"commands without bad-input cases (add cases, or a reason in NO_BAD_VALUES): {missing}"
    reads_config = sorted(p for p, cmd in commands.items()
                          if any("--config" in getattr(prm, "opts", []) for prm in cmd.params)
                          and p not in WRITES_CONFIG and p not in MINIMAL and p not in NO_BAD_VALUES)
    assert not reads_config, f"commands reading --config without a MINIMAL entry: {reads_config}"


# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(lab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The lab with VPG erp synced (no Prefect: the engine directly), bad configs beside it."""
    from vmrep.replication import engine

    rt = lab.runtime()
    engine.initial_sync(rt, rt.config.vpg(VPG))
    rt.store.update_runtime(VPG, initial_sync_done=True)
    rt.store.set_status(VPG, "MeetingSLA", "DeltaSync")
    forget_runtime(lab.config_path)  # each case logs in afresh (a refused login must be tried)

    work = tmp_path_factory.mktemp("bad-input")
    (work / "not-yaml.yaml").write_text("sites: [siteA\n  vpgs: {\n")
    (work / "a-list.yaml").write_text("- sites\n- vpgs\n")
    data = yaml.safe_load(lab.config_path.read_text())
    data["journal"]["block_size"] = 1000
    (work / "bad-field.yaml").write_text(yaml.safe_dump(data))
    data = yaml.safe_load(lab.config_path.read_text())
    data["vpgs"][0]["rpo_target_seconds"] = 0
    (work / "zero-rpo.yaml").write_text(yaml.safe_dump(data))
    file = work / "a-file"
    file.write_text("not a folder\n")
    home = tmp_path_factory.mktemp("vmrep-home")
    return {"work": work, "file": file, "home": home}


def _state(lab, env: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    rt = lab.runtime()
    files = {str(p.relative_to(env["work"])) for p in env["work"].rglob("*")}
    files |= {f"home/{p.relative_to(env['home'])}" for p in env["home"].rglob("*")}
    return {"checkpoints": {v.name: [cp.id for cp in rt.journal.checkpoints(v.name)] for v in rt.config.vpgs},
            "operations": len(rt.store.frame("operations")), "files": files}


def _vsphere_tasks(lab) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Calls that change something at a site (every vSphere change is a *_Task)."""
    out = {}
    for site in ("siteA", "siteB"):
        for method, n in lab.control(site).calls().items():
            if method.endswith("_Task") or method in ("ShutdownGuest", "MarkAsVirtualMachine"):
                out[f"{site} {method}"] = n
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda k: k.id)
def test_bad_value_is_one_line_naming_it_and_nothing_is_done(  # type: ignore[no-untyped-def]
        case: Case, lab, env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMREP_HOME", str(env["home"]))  # `lab up` must not find or touch a real lab
    monkeypatch.setenv("VMREP_CONFIG", str(lab.config_path))
    subst = {"work": str(env["work"]), "file": str(env["file"])}
    argv = [a.format(**subst) for a in case.argv]
    names = case.names.format(**subst)
    before = _state(lab, env)
    for site in ("siteA", "siteB"):
        lab.control(site).reset_calls()
    if case.refuse_login:
        forget_runtime(lab.config_path)
        lab.control(case.refuse_login).fault("Login", fault="InvalidLogin", count=0)
    capsys.readouterr()
    try:
        rc = main(argv)
    finally:
        if case.refuse_login:
            lab.control(case.refuse_login).clear_faults()
            forget_runtime(lab.config_path)
    out = capsys.readouterr()
    err_lines = [line for line in out.err.splitlines() if line.strip()]

    assert rc != 0, f"exit 0 for {argv}; stdout: {out.out!r}"
    assert "Traceback" not in out.out + out.err
    assert len(err_lines) == 1, f"stderr is not one line: {out.err!r}"
    assert names in err_lines[0], f"stderr does not name {names!r}: {err_lines[0]!r}"
    if case.refuse_login:
        assert "login refused" in out.out + out.err  # validate says so on stdout, its error line names the site
    assert _state(lab, env) == before, "a refused command left something behind"
    assert _vsphere_tasks(lab) == {}, "a refused command changed something at a site"
    assert not os.path.exists("/no/such/dir"), "a refused command created a folder"
