"""Configuration models: sites, journal, VPGs.

Loaded from YAML (`vmrep.yaml`). Every setting of docs/concepts.md is here with its default.
Unknown keys are errors (a typo must name the field, not be silently ignored), and
secrets are only ever references (environment variable or Prefect Secret block).

Why one module of ~500 lines: it is the schema of `vmrep.yaml`, model by model with each
field's default and description; one file is how the whole schema reads in one place
(docs/configuration.md follows it section by section).
"""

from __future__ import annotations

from collections.abc import Mapping

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vmrep.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SecretRef(Strict):
    """Where a secret lives: an environment variable, a Prefect Secret block, or a file
    readable only by its owner (as container secrets are mounted). Exactly one."""

    env: str | None = None
    prefect_secret: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one(self) -> "SecretRef":
        if sum(x is not None for x in (self.env, self.prefect_secret, self.file)) != 1:
            raise ValueError("give exactly one of 'env', 'prefect_secret' or 'file'")
        return self

    def describe(self) -> str:
        if self.env:
            return f"env:{self.env}"
        if self.file:
            return f"file:{self.file}"
        return f"prefect_secret:{self.prefect_secret}"


def _secret_ref(value: Any) -> Any:
    if isinstance(value, str):
        if value.startswith("env:"):
            return {"env": value[4:]}
        if value.startswith("prefect_secret:"):
            return {"prefect_secret": value[len("prefect_secret:") :]}
        if value.startswith("file:"):
            return {"file": value[5:]}
        raise ValueError(
            "must be a reference ('env:VAR', 'prefect_secret:NAME', 'file:PATH' or a mapping), "
            "never a clear-text value"
        )
    return value


class TLSSettings(Strict):
    """TLS to vCenter is verified unless `insecure` is said explicitly."""

    ca_file: Path | None = None
    thumbprint: str | None = Field(
        default=None, description="pinned SHA-256 thumbprint of the server certificate"
    )
    insecure: bool = False

    @field_validator("thumbprint")
    @classmethod
    def _thumb(cls, v: str | None) -> str | None:
        if v is None:
            return v
        hexpart = v.replace(":", "").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", hexpart):
            raise ValueError("must be a SHA-256 thumbprint (64 hex digits, ':' allowed)")
        return hexpart


class Site(Strict):
    name: str = ""
    host: str = Field(description="vCenter/ESXi address, host or host:port")
    user: str = "administrator@vsphere.local"
    password: Annotated[SecretRef, Field(description="reference to the password")]
    datacenter: str | None = None
    tls: TLSSettings = TLSSettings()
    # Datastores also mounted on the replication host: read/write the same files locally.
    datastore_mounts: dict[str, Path] = {}
    timeout_seconds: float = Field(default=60.0, gt=0)
    # Bound of one TCP connect to the site: a site that does not answer within it is
    # reported unreachable at once (a refused connection is retried for a few seconds).
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    # Lab only: the simulator's fault-injection control endpoint.
    lab_control_url: str | None = None
    # Slots of the site's Prefect global concurrency limit `vcenter-<site>`: at most this
    # many vCenter-heavy steps (snapshot create/remove) of all VPGs at once on this vCenter.
    vcenter_slots: int = Field(default=4, ge=1, description="concurrent vCenter-heavy steps on this site")
    # The journal of VPGs recovered at this site, as the other sites reach it: over the
    # WAN through this site's journal service (docs/journal-service.md). None: the journal
    # directory is reached directly (one machine, or both sites the same).
    journal_service: "JournalServiceClient | None" = None

    _secret = field_validator("password", mode="before")(_secret_ref)


class JournalServiceClient(Strict):
    """How a protected site reaches a recovery site's journal service."""

    url: str = Field(description="https://host:port of `vmrep journal serve` at the recovery site")
    credential: Annotated[SecretRef, Field(description="reference to this site's writer token")]
    tls: TLSSettings = TLSSettings()
    timeout_seconds: float = Field(default=120.0, gt=0)

    _secret = field_validator("credential", mode="before")(_secret_ref)

    @field_validator("url")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError("must be an https:// URL (the journal service speaks only TLS)")
        return v.rstrip("/")


class ServiceCredential(Strict):
    """One credential of the journal service: a name (logged), a role and a token reference.
    A writer is bound to the protected site whose VPGs it may write."""

    name: str
    role: Literal["writer", "admin"]
    site: str | None = None
    token: Annotated[SecretRef, Field(description="reference to the bearer token")]

    _secret = field_validator("token", mode="before")(_secret_ref)

    @model_validator(mode="after")
    def _site(self) -> "ServiceCredential":
        if self.role == "writer" and not self.site:
            raise ValueError("a writer credential needs 'site' (the protected site it writes for)")
        return self


class JournalServiceSettings(Strict):
    """`vmrep journal serve` at the recovery site (docs/journal-service.md)."""

    listen: str = "127.0.0.1:8443"
    cert_file: Path
    key_file: Path
    credentials: list[ServiceCredential] = []
    # An open checkpoint whose writer sent nothing for this long is aborted (its lock freed).
    session_idle_seconds: float = Field(default=900.0, gt=0)


class JournalSettings(Strict):
    path: Path = Path("journal")
    block_size: int = 1024 * 1024
    # zstd's levels are 1..22 (23 and up raise in the middle of a transfer); 0 stores raw.
    compression_level: int = Field(default=1, ge=0, le=22)
    service: "JournalServiceSettings | None" = None
    # How often the recovery site's `retention/<site>` deployment applies its VPGs'
    # retention (flows/retention.py): the hard limit may be overshot by what replication
    # writes in this time, and history kept this much longer than journal_history_hours.
    retention_interval_seconds: float = Field(default=300.0, ge=10, le=86400)

    @field_validator("block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v < 4096 or v & (v - 1):
            raise ValueError("must be a power of two of at least 4096")
        return v


class IPSettings(Strict):
    dhcp: bool = True
    ip: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    dns: list[str] = []

    @model_validator(mode="after")
    def _static_needs_ip(self) -> "IPSettings":
        if not self.dhcp and not (self.ip and self.netmask):
            raise ValueError("a static setting (dhcp: false) needs ip and netmask")
        return self


class NIC(Strict):
    live_network: str | None = None
    test_network: str | None = None
    live_ip: IPSettings = IPSettings()
    test_ip: IPSettings = IPSettings()


class VMSpec(Strict):
    name: str
    boot_group: str | None = None
    recovery_host: str | None = None
    recovery_datastore: str | None = None
    recovery_folder: str | None = None
    nics: list[NIC] = []
    # Disk copies already at the recovery site (disk id 'scsi0:0' -> '[ds] path-flat.vmdk'):
    # the initial sync then sends only the blocks that differ.
    preseed: dict[str, str] = {}


class BootGroup(Strict):
    name: str
    delay_seconds: float = Field(default=0.0, ge=0)


class Script(Strict):
    command: str
    timeout_seconds: float = Field(default=300.0, gt=0)


class RecoveryDefaults(Strict):
    cluster: str | None = None
    host: str | None = None
    datastore: str | None = None
    resource_pool: str | None = None
    folder: str | None = None
    live_network: str | None = None
    test_network: str | None = None


class Priority(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"


class CommitPolicy(Strict):
    policy: Literal["none", "commit", "rollback"] = "commit"
    timeout_minutes: float = Field(default=60.0, ge=0)


TestInterval = Literal["off", 1, 3, 6, 9, 12]


class VPG(Strict):
    name: str
    protected_site: str
    recovery_site: str
    vms: list[VMSpec] = Field(min_length=1)
    priority: Priority = Priority.medium
    # A target of zero or less could never be met: every status would be an alert.
    rpo_target_seconds: float = Field(default=300.0, gt=0)
    # The recovery time objective: a test, failover or move is judged against it (its
    # measured RTO recorded beside it); zero or less could never be met.
    rto_target_seconds: float = Field(default=900.0, gt=0)
    journal_history_hours: float = 24.0
    journal_hard_limit_gb: float = 150.0
    journal_warning_percent: float = Field(default=75.0, gt=0, le=100)
    # Checkpoints younger than this are removed by nothing: not retention, the hard limit,
    # a shortened journal_history_hours, nor GC (docs/ransomware.md). 0: no lock.
    retention_lock_hours: float = Field(default=0.0, ge=0, le=30 * 24)
    test_interval_months: TestInterval = 6
    wan_compression: bool = True
    recovery: RecoveryDefaults = RecoveryDefaults()
    boot_groups: list[BootGroup] = []
    pre_recovery_script: Script | None = None
    post_recovery_script: Script | None = None
    commit_policy: CommitPolicy = CommitPolicy()
    shutdown_policy: Literal["none", "graceful", "force"] = "none"
    email_to: list[str] = []
    # How changed blocks are found (docs/configuration.md): enable = turn CBT on at initial
    # sync and use it; use-if-present = use it where the VM already tracks; off = hash scan.
    change_tracking: Literal["enable", "use-if-present", "off"] = "enable"
    # Every this many hours a replication cycle ends with `verify --against-source` (the
    # guard against changes CBT lost); 0 = never on its own.
    verify_against_source_hours: float = Field(default=0.0, ge=0)
    # Live failover and move started from a deployment (the UI, a schedule, the API) wait
    # for a person to approve them in the Prefect UI when `required`; see docs/recovery.md.
    approval: Literal["none", "required"] = "none"

    @field_validator("journal_history_hours")
    @classmethod
    def _history_range(cls, v: float) -> float:
        if not 1.0 <= v <= 30 * 24:
            raise ValueError("must be between 1 hour and 30 days (720)")
        return v

    @field_validator("journal_hard_limit_gb")
    @classmethod
    def _limit(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0 (0 = no limit)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "VPG":
        names = [vm.name for vm in self.vms]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"VM listed twice: {', '.join(sorted(dup))}")
        groups = {g.name for g in self.boot_groups}
        for vm in self.vms:
            if vm.boot_group is not None and vm.boot_group not in groups:
                raise ValueError(f"VM {vm.name}: boot_group {vm.boot_group!r} is not in boot_groups")
        return self

    @property
    def history_seconds(self) -> float:
        return self.journal_history_hours * 3600.0

    @property
    def hard_limit_bytes(self) -> int:
        return int(self.journal_hard_limit_gb * 1024**3)

    @property
    def is_local(self) -> bool:
        return self.protected_site == self.recovery_site

    def vm(self, name: str) -> VMSpec:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise ConfigError(f"VPG {self.name}: no VM named {name!r}")

    def ordered_boot_groups(self) -> list[tuple[BootGroup, list[VMSpec]]]:
        """Boot groups in ascending order (as listed); VMs without a group boot last."""
        out: list[tuple[BootGroup, list[VMSpec]]] = []
        for g in self.boot_groups:
            members = [vm for vm in self.vms if vm.boot_group == g.name]
            if members:
                out.append((g, members))
        rest = [vm for vm in self.vms if vm.boot_group is None]
        if rest:
            out.append((BootGroup(name="default"), rest))
        return out


class DomainControllerMarker(Strict):
    """How a domain controller is recognised: vSphere cannot see the role itself."""

    tag: str | None = "domain-controller"
    custom_attribute: str | None = "vmrep.role"
    custom_attribute_value: str = "domain-controller"
    notes_pattern: str | None = r"(?i)\bdomain controller\b"


class Notifications(Strict):
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    security: Literal["plain", "starttls", "ssl"] = "plain"
    username: str | None = None
    password: SecretRef | None = None
    sender: str = "vmrep@localhost"
    default_to: list[str] = []
    email_credentials_block: str | None = None

    _secret = field_validator("password", mode="before")(
        lambda v: None if v is None else _secret_ref(v)
    )


class Config(Strict):
    sites: dict[str, Site]
    journal: JournalSettings = JournalSettings()
    vpgs: list[VPG] = []
    home: Path | None = None
    database_url: str | None = None
    domain_controller_marker: DomainControllerMarker = DomainControllerMarker()
    notifications: Notifications = Notifications()
    # Where the file was read from: relative paths are relative to it.
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _refs(self) -> "Config":
        for name, site in self.sites.items():
            site.name = name
        seen: set[str] = set()
        for vpg in self.vpgs:
            if vpg.name in seen:
                raise ValueError(f"VPG {vpg.name!r} defined twice")
            seen.add(vpg.name)
            for field in ("protected_site", "recovery_site"):
                site = getattr(vpg, field)
                if site not in self.sites:
                    raise ValueError(f"VPG {vpg.name}: {field} {site!r} is not a site in 'sites'")
        if self.journal.service is not None:
            for cred in self.journal.service.credentials:
                if cred.site is not None and cred.site not in self.sites:
                    raise ValueError(f"journal.service.credentials[{cred.name}]: site {cred.site!r} "
                                     "is not a site in 'sites'")
        return self

    def vpg(self, name: str) -> VPG:
        for v in self.vpgs:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.vpgs) or "none"
        raise ConfigError(f"no VPG named {name!r} (known: {known})")

    def site(self, name: str) -> Site:
        try:
            return self.sites[name]
        except KeyError:
            raise ConfigError(f"no site named {name!r}") from None

    def resolve(self, p: Path) -> Path:
        if p.is_absolute() or self.source is None:
            return p
        return (self.source.parent / p).resolve()

    @property
    def journal_path(self) -> Path:
        return self.resolve(self.journal.path)


def _loc(err: Mapping[str, Any], data: Any) -> str:
    """Turn a pydantic error location into a path a user recognises (VPG/VM names, not indexes)."""
    parts: list[str] = []
    node = data
    for item in err["loc"]:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            elem = node[item]
            label = elem.get("name") if isinstance(elem, dict) else None
            parts.append(f"[{label}]" if label else f"[{item}]")
            node = elem
        else:
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts)


def format_validation_error(exc: ValidationError, data: Any) -> list[str]:
    lines = []
    for err in exc.errors():
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (typo?)"
        msg = msg.removeprefix("Value error, ")
        loc = _loc(err, data)
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


def parse_config(data: Any, source: Path | None = None) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping at the top level")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        lines = format_validation_error(exc, data)
        raise ConfigError("; ".join(lines), lines=lines) from None
    cfg.source = source.resolve() if source else None
    if cfg.source is not None:
        # Paths in the file are relative to the file, wherever the command runs.
        for site in cfg.sites.values():
            if site.tls.ca_file is not None:
                site.tls.ca_file = cfg.resolve(site.tls.ca_file)
            if site.password.file is not None:
                site.password.file = cfg.resolve(site.password.file)
            site.datastore_mounts = {k: cfg.resolve(v) for k, v in site.datastore_mounts.items()}
            js = site.journal_service
            if js is not None:
                if js.tls.ca_file is not None:
                    js.tls.ca_file = cfg.resolve(js.tls.ca_file)
                if js.credential.file is not None:
                    js.credential.file = cfg.resolve(js.credential.file)
        svc = cfg.journal.service
        if svc is not None:
            svc.cert_file, svc.key_file = cfg.resolve(svc.cert_file), cfg.resolve(svc.key_file)
            for c in svc.credentials:
                if c.token.file is not None:
                    c.token.file = cfg.resolve(c.token.file)
    return cfg


def default_config_path() -> Path:
    import os

    return Path(os.environ.get("VMREP_CONFIG", "vmrep.yaml"))


def load_config(path: Path | str | None = None) -> Config:
    p = Path(path) if path else default_config_path()
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found (give --config or set VMREP_CONFIG)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if isinstance(data, dict):
        own = list(data.get("vpgs") or [])
        names = {v.get("name") for v in own if isinstance(v, dict)}
        generated = [v for v in generated_vpgs(p) if v.get("name") not in names]
        if generated:
            data["vpgs"] = own + generated
    return parse_config(data, p)


GENERATED_VPGS_DIR = Path("vmrep.d") / "vpgs"


def generated_vpgs(config_path: Path) -> list[dict[str, Any]]:
    """VPG definitions vmrep wrote itself beside the config (reverse protection, see
    docs/recovery.md): `<config dir>/vmrep.d/vpgs/*.yaml`, each `{vpg: {...}, ...}`.
    A VPG of the same name in the config file itself wins."""
    d = config_path.resolve().parent / GENERATED_VPGS_DIR
    if not d.is_dir():
        return []
    out = []
    for f in sorted(d.glob("*.yaml")):
        try:
            doc = yaml.safe_load(f.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{f}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if isinstance(doc, dict) and isinstance(doc.get("vpg"), dict):
            out.append(doc["vpg"])
    return out
