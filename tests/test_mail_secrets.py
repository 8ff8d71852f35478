"""vmrep.secrets: references resolve from the environment; errors name the reference and
never the value. (Prefect Secret blocks: tests/test_reports_prefect.py.)"""

from __future__ import annotations

import logging

import pytest

from vmrep.config import SecretRef
from vmrep.errors import SecretError
from vmrep.secrets import resolve_secret

VALUE = "hunter2-Very-Secret"


def test_env_reference_in_every_form(monkeypatch):
    monkeypatch.setenv("VMREP_T_PW", VALUE)
    assert resolve_secret("env:VMREP_T_PW") == VALUE
    assert resolve_secret({"env": "VMREP_T_PW"}) == VALUE
    assert resolve_secret(SecretRef(env="VMREP_T_PW")) == VALUE
    assert resolve_secret("env:OTHER", environ={"OTHER": "x"}) == "x"


def test_missing_or_empty_variable_names_the_reference_and_the_setting(monkeypatch):
    monkeypatch.delenv("VMREP_T_NONE", raising=False)
    with pytest.raises(SecretError) as e:
        resolve_secret("env:VMREP_T_NONE", "sites.prod.password")
    assert str(e.value) == "sites.prod.password (env:VMREP_T_NONE): environment variable VMREP_T_NONE is not set"
    monkeypatch.setenv("VMREP_T_NONE", "")
    with pytest.raises(SecretError, match=r"^secret env:VMREP_T_NONE: environment variable"):
        resolve_secret("env:VMREP_T_NONE")


@pytest.mark.parametrize("bad", [VALUE, {"value": VALUE}, {"env": VALUE, "prefect_secret": VALUE}])
def test_a_clear_text_value_is_refused_without_being_echoed(bad):
    with pytest.raises(SecretError) as e:
        resolve_secret(bad, "notifications.password")
    assert VALUE not in str(e.value)
    assert str(e.value).startswith("notifications.password: not a secret reference")


def test_the_value_is_never_logged(monkeypatch, caplog):
    monkeypatch.setenv("VMREP_T_PW", VALUE)
    with caplog.at_level(logging.DEBUG):
        resolve_secret("env:VMREP_T_PW", "sites.prod.password")
    assert caplog.records  # it does log that it resolved the reference...
    assert all(VALUE not in r.getMessage() for r in caplog.records)  # ...not what it found


def test_a_prefect_reference_without_the_control_plane_is_refused_in_one_line(monkeypatch):
    from vmrep import secrets

    monkeypatch.setattr(secrets, "_resolvers", {})  # the engine alone: nothing registered
    with pytest.raises(SecretError) as e:
        resolve_secret("prefect_secret:smtp", "notifications.password")
    assert str(e.value).startswith("notifications.password (prefect_secret:smtp): Prefect Secret blocks are read")
    assert "\n" not in str(e.value)


def test_a_registered_resolver_gets_the_name_and_the_label(monkeypatch):
    from vmrep import secrets

    calls = []
    monkeypatch.setattr(secrets, "_resolvers", {})
    secrets.register_resolver("prefect", lambda name, label: calls.append((name, label)) or VALUE)
    assert resolve_secret({"prefect_secret": "smtp"}, "notifications.password") == VALUE
    assert calls == [("smtp", "notifications.password (prefect_secret:smtp)")]


def test_the_control_plane_registers_the_prefect_resolver():
    import tasks  # noqa: F401 - importing any task or flow module does this
    from tasks.prefect_secrets import prefect_secret
    from vmrep import secrets

    assert secrets._resolvers["prefect"] is prefect_secret


def test_the_vmrep_command_reads_prefect_references():
    # A fresh interpreter: the command's quick paths import no flow, the registration
    # must come with the command itself.
    import subprocess
    import sys

    code = "import vmrep.cli, vmrep.secrets as s; print(sorted(s._resolvers))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['prefect']"
