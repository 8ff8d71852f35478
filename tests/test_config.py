"""Configuration: every mistake is one line naming the field; secrets only by reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vmrep.cli import main
from vmrep.config import load_config, parse_config
from vmrep.errors import ConfigError, SecretError
from vmrep.secrets import resolve_secret

BASE = {
    "sites": {"a": {"host": "127.0.0.1:1", "password": "env:VMREP_TEST_PW"}},
    "vpgs": [{"name": "web", "protected_site": "a", "recovery_site": "a", "vms": [{"name": "web-1"}]}],
}


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "vmrep.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_of_design() -> None:
    cfg = parse_config(BASE)
    v = cfg.vpg("web")
    assert v.priority.value == "medium"
    assert v.rpo_target_seconds == 300
    assert v.journal_history_hours == 24
    assert v.journal_hard_limit_gb == 150 and v.journal_warning_percent == 75
    assert v.test_interval_months == 6
    assert v.wan_compression is True
    assert v.commit_policy.policy == "commit" and v.commit_policy.timeout_minutes == 60
    assert v.shutdown_policy == "none"
    assert cfg.sites["a"].tls.insecure is False


def test_typo_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["vpgs"][0]["rpo_targt_seconds"] = 10
    rc = main(["validate", "--config", str(write(tmp_path, data))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["error: vpgs[web].rpo_targt_seconds: unknown field (typo?)"]


def test_bad_values_name_the_field() -> None:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["vpgs"][0]["journal_history_hours"] = 0.5
    with pytest.raises(ConfigError, match=r"^vpgs\[web\].journal_history_hours: must be between 1 hour and 30 days"):
        parse_config(data)
    data["vpgs"][0]["journal_history_hours"] = 2
    data["vpgs"][0]["vms"][0]["boot_group"] = "db"
    with pytest.raises(ConfigError, match=r"^vpgs\[web\]: VM web-1: boot_group 'db' is not in boot_groups"):
        parse_config(data)


def test_unknown_site_reference() -> None:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["vpgs"][0]["recovery_site"] = "b"
    with pytest.raises(ConfigError, match="VPG web: recovery_site 'b' is not a site"):
        parse_config(data)


def test_clear_text_password_refused() -> None:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["sites"]["a"]["password"] = "hunter2"
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert "sites.a.password" in str(e.value) and "never a clear-text value" in str(e.value)
    assert "hunter2" not in str(e.value)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("sites:\n  a: {host: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(p)


def test_secret_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(BASE)
    with pytest.raises(SecretError, match="environment variable VMREP_TEST_PW is not set"):
        resolve_secret(cfg.sites["a"].password, "sites.a.password", environ={})
    assert resolve_secret(cfg.sites["a"].password, environ={"VMREP_TEST_PW": "s3"}) == "s3"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert resolve_secret(f"file:{f}") == "from-file"


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["sites"]["a"]["tls"] = {"ca_file": "certs/ca.pem"}
    data["journal"] = {"path": "j"}
    cfg = load_config(write(tmp_path, data))
    assert cfg.sites["a"].tls.ca_file == (tmp_path / "certs" / "ca.pem").resolve()
    assert cfg.journal_path == (tmp_path / "j").resolve()


def test_change_tracking_and_source_verification_settings() -> None:
    v = parse_config(BASE).vpg("web")
    assert v.change_tracking == "enable" and v.verify_against_source_hours == 0
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["vpgs"][0]["change_tracking"] = "maybe"
    with pytest.raises(ConfigError, match=r"^vpgs\[web\].change_tracking: Input should be 'enable', 'use-if-present'"):
        parse_config(data)
    data["vpgs"][0]["change_tracking"] = "use-if-present"
    data["vpgs"][0]["verify_against_source_hours"] = -1
    with pytest.raises(ConfigError, match=r"^vpgs\[web\].verify_against_source_hours: Input should be greater"):
        parse_config(data)


def test_compression_level_is_one_zstd_has() -> None:
    """zstd refuses levels above 22 only when it first compresses (a traceback in the
    middle of a cycle): the config names the field instead."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["journal"] = {"compression_level": 23}
    with pytest.raises(ConfigError, match=r"^journal.compression_level: Input should be less than or equal to 22"):
        parse_config(data)
    data["journal"] = {"compression_level": -1}
    with pytest.raises(ConfigError, match=r"^journal.compression_level: Input should be greater than or equal to 0"):
        parse_config(data)
    data["journal"] = {"compression_level": 0}  # 0: every block stored raw
    assert parse_config(data).journal.compression_level == 0
