"""The one typed settings object: a YAML file plus DXGATE_* environment variables.

Precedence: explicit arguments > environment (`DXGATE_<KEY>`, nested with `__`, lists/maps as JSON)
> YAML file > defaults. Unknown keys and unknown DXGATE_* variables are refused, naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from dicom_gateway.errors import ConfigError
from dicom_gateway.settings_security import AE_TITLE_PATTERN, AllowedAE, ApiToken, Limits, TlsSettings, is_loopback

ENV_PREFIX = "DXGATE_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Destination(_Strict):
    """A DICOM node that receives results (C-STORE SCP)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: str = Field(pattern=AE_TITLE_PATTERN)
    host: str
    port: int = Field(ge=1, le=65535)
    overlay: Literal["gsps", "sc", "none"] = "gsps"
    """Fallback for viewers that render neither SR nor SEG: GSPS or a burned-in secondary capture."""
    send_sr: bool = True
    send_seg: bool = True
    tls: bool = False
    """C-STORE over TLS (PS3.15 B), the peer verified against `tls.ca_file` (or the system's CAs)."""


class Range(_Strict):
    min: float | None = None
    max: float | None = None


class RuleMatch(_Strict):
    """Conditions on a study's series; all given conditions must hold (AND); lists are OR."""

    modality: list[str] | None = None
    body_part: list[str] | None = None
    series_description: str | None = None  # Python regex, case-insensitive search
    slice_thickness: Range | None = None
    orientation: list[Literal["axial", "sagittal", "coronal"]] | None = None
    calling_ae: list[str] | None = None
    min_slices: int | None = Field(default=None, ge=1)


class Rule(_Strict):
    name: str
    match: RuleMatch = RuleMatch()
    models: list[str] = Field(min_length=1)
    destinations: list[str] = Field(default_factory=list)  # names; empty = all destinations


class SenderSettings(_Strict):
    max_attempts: int = Field(default=6, ge=1)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)


class WorkerSettings(_Strict):
    count: int = Field(default=1, ge=1, le=16)
    lease_s: float = Field(default=600.0, gt=0)
    poll_interval_s: float = Field(default=0.2, gt=0)
    max_crashes: int = Field(default=3, ge=1)
    """A job that was RUNNING when the process died this many times in a row ends FAILED (no crash loop)."""


class BackendSettings(_Strict):
    """Which backend serves a model: in-process ONNX Runtime or a Triton Inference Server."""

    kind: Literal["onnxruntime", "triton", "torch"] = "onnxruntime"
    url: str | None = None  # triton: host:port
    protocol: Literal["grpc", "http"] = "grpc"
    shared_memory: bool = False
    providers: list[str] | None = None  # onnxruntime: None = best available (TensorRT, CUDA, CPU)
    intra_op_threads: int = Field(default=0, ge=0)  # 0 = ORT default (all cores)
    device_preprocess: bool = True  # onnxruntime on CUDA: resample + window on the GPU too


def default_rules() -> list[Rule]:
    """The bundled models' routing, used when the configuration names no rules (`make run`)."""
    return [
        Rule(name="chest-ct-nodules", models=["lung_nodule_ct"],
             match=RuleMatch(modality=["CT"], body_part=["CHEST", "LUNG", "THORAX"], orientation=["axial"],
                             slice_thickness=Range(max=3.0))),
        Rule(name="spine-vertebrae", models=["spine_vertebrae_ct"],
             match=RuleMatch(modality=["CT"], body_part=["SPINE", "CSPINE", "TSPINE", "LSPINE"])),
    ]


class Settings(BaseSettings):
    """Every setting of one dxgate process. Created once, passed in; never mutated."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    ae_title: str = Field(default="DXGATE", pattern=AE_TITLE_PATTERN)
    bind_address: str = "127.0.0.1"
    dicom_port: int = Field(default=11112, ge=0, le=65535)
    """Plain TCP port of the SCP; 0 = none (TLS only, `tls.port`)."""
    tls: TlsSettings | None = None
    http_bind_address: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    http_allowed_hosts: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"])
    """Host header values the API answers (plus http_bind_address); anything else gets 400."""
    api_tokens: list[ApiToken] = Field(default_factory=list)
    """Bearer tokens of the API; empty = one admin token generated into data_dir at first start."""
    insecure: bool = False
    """Allow a non-loopback bind_address with neither TLS nor an allow-list (not recommended)."""
    data_dir: Path = Path("./var")
    models_dir: Path = Path("./models")
    allowed_calling_aes: list[str | AllowedAE] = Field(default_factory=list)
    """Calling AE titles allowed to associate, each optionally bound to hosts; empty = any."""
    destinations: list[Destination] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=default_rules)
    quiet_seconds: float = Field(default=2.0, ge=0)
    quiet_seconds_by_ae: dict[str, float] = Field(default_factory=dict)
    fsync: bool = True
    max_associations: int = Field(default=16, ge=1)
    max_pdu: int = Field(default=262144, ge=4096, le=16 * 1024 * 1024)
    """Largest P-DATA PDU we accept (PS3.8 D.3.3.2.1); a larger one aborts the association."""
    abort_grace_seconds: float = Field(default=30.0, ge=0)
    """After an aborted association, wait this long for the sender's retry before judging completeness."""
    limits: Limits = Limits()
    tcp_nodelay: bool = True
    min_free_disk_mb: int = Field(default=512, ge=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    receivers: int = Field(default=1, ge=1, le=16)
    """Storage SCP processes sharing dicom_port (SO_REUSEPORT, Linux); 1 = the SCP runs in the main process."""
    sender: SenderSettings = SenderSettings()
    worker: WorkerSettings = WorkerSettings()
    backends: dict[str, BackendSettings] = Field(default_factory=dict)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("allowed_calling_aes")
    @classmethod
    def _ae_titles(cls, v: list[str | AllowedAE]) -> list[str | AllowedAE]:
        import re

        for ae in v:
            if isinstance(ae, str) and not re.match(AE_TITLE_PATTERN, ae):
                raise ValueError(f"{ae!r} is not a valid AE title (1-16 characters, no backslash)")
        return v

    @property
    def calling_aes(self) -> list[AllowedAE]:
        """The allow-list with plain AE titles as entries for any host."""
        return [AllowedAE(ae_title=a) if isinstance(a, str) else a for a in self.allowed_calling_aes]

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique, got {names}")
        for rule in self.rules:
            for dest in rule.destinations:
                if dest not in names:
                    raise ValueError(f"rule {rule.name!r} names unknown destination {dest!r}")
        if self.dicom_port == 0 and self.tls is None:
            raise ValueError("dicom_port: 0 (no plain listener) needs tls: {port, cert_file, key_file}")
        if self.tls is not None and self.tls.port == self.dicom_port:
            raise ValueError(f"tls.port and dicom_port are both {self.dicom_port}; give TLS its own port")
        if self.tls is not None and self.tls.require_client_cert and self.tls.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file (the CAs that sign client certificates)")
        if any(d.tls for d in self.destinations) and self.tls is None:
            raise ValueError("a destination with tls: true needs tls: {cert_file, key_file, ca_file} for the "
                             "sender's identity and the CAs it trusts")
        if self.exposed_without_protection:
            raise ValueError(
                f"bind_address {self.bind_address} accepts DICOM from the network with neither "
                "allowed_calling_aes nor tls; set allowed_calling_aes (AE titles, bound to hosts), or "
                "tls: {port, cert_file, key_file}, or insecure: true to accept any caller")
        return self

    @property
    def exposed_without_protection(self) -> bool:
        """A non-loopback DICOM listener with neither an allow-list nor TLS, and not marked insecure."""
        return (not is_loopback(self.bind_address) and not self.insecure and self.tls is None
                and not self.allowed_calling_aes)

    # -- derived paths -------------------------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def min_free_disk_bytes(self) -> int:
        return self.min_free_disk_mb * 1024 * 1024

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    def quiet_for(self, calling_ae: str | None) -> float:
        if calling_ae and calling_ae in self.quiet_seconds_by_ae:
            return self.quiet_seconds_by_ae[calling_ae]
        return self.quiet_seconds

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _check_env_names(environ: dict[str, str]) -> None:
    known = set(Settings.model_fields)
    for name in environ:
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].split("__", 1)[0].lower()
        if key not in known:
            raise ConfigError(f"unknown environment variable {name}: {key!r} is not a dxgate setting")


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {loc}: {msg}")
    return f"invalid configuration ({source}):\n" + "\n".join(lines)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from an optional YAML file, DXGATE_* variables and explicit overrides.

    Sources are deep-merged (nested keys such as DXGATE_SENDER__MAX_ATTEMPTS override one field of
    the file's `sender:` block). Raises ConfigError naming each wrong key or value.
    """
    _check_env_names(dict(os.environ))
    if config is not None:
        _read_yaml(config)  # clear errors for a missing file, bad YAML or a non-mapping
    cls: type[Settings] = Settings
    if config is not None:
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": str(config)}})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        source = f"{config}" if config else "defaults"
        raise ConfigError(_format_validation(exc, f"{source} + {ENV_PREFIX}* environment")) from exc


def example_config() -> str:
    """A complete, commented configuration (what `dxgate config example` prints)."""
    return (Path(__file__).with_name("example_config.yaml")).read_text(encoding="utf-8")
