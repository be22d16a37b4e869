"""The configuration contract: YAML + DXGATE_* overrides, refusal naming the wrong key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_gateway.errors import ConfigError
from dicom_gateway.settings import Settings, example_config, load_settings


def test_example_config_is_complete_and_valid(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(example_config())
    s = load_settings(cfg)
    for key in ("ae_title", "dicom_port", "http_port", "data_dir", "models_dir", "allowed_calling_aes",
                "destinations", "rules"):
        assert f"\n{key}:" in "\n" + example_config(), key
        assert key in Settings.model_fields
    assert s.destinations[0].name == "pacs"
    assert {m for r in s.rules for m in r.models} == {"lung_nodule_ct", "spine_vertebrae_ct"}


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ae_title: FROMFILE\ndicom_port: 4000\nsender: {max_attempts: 2, timeout_s: 5}\n")
    monkeypatch.setenv("DXGATE_DICOM_PORT", "4100")
    monkeypatch.setenv("DXGATE_SENDER__MAX_ATTEMPTS", "9")
    monkeypatch.setenv("DXGATE_ALLOWED_CALLING_AES", '["PACS1", "PACS2"]')
    s = load_settings(cfg)
    assert s.ae_title == "FROMFILE"
    assert s.dicom_port == 4100
    assert s.sender.max_attempts == 9 and s.sender.timeout_s == 5  # nested merge keeps the file's other key
    assert s.allowed_calling_aes == ["PACS1", "PACS2"]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("ae_titel: X\n", "ae_titel"),
        ("dicom_port: 70000\n", "dicom_port"),
        ("ae_title: WAY_TOO_LONG_AE_TITLE\n", "ae_title"),
        ("destinations: [{name: a, ae_title: A, host: h, port: 1, colour: red}]\n", "colour"),
        ("rules: [{name: r, models: [m], destinations: [nowhere]}]\n", "nowhere"),
        ("sender: {max_attempts: 0}\n", "sender.max_attempts"),
    ],
)
def test_wrong_key_or_value_is_refused_naming_it(tmp_path: Path, text: str, named: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert named in str(err.value)


def test_unknown_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DXGATE_DICOM_PROT", "1")
    with pytest.raises(ConfigError, match="DXGATE_DICOM_PROT"):
        load_settings()


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(listy)


def test_quiet_seconds_per_calling_ae() -> None:
    s = Settings(quiet_seconds=2, quiet_seconds_by_ae={"SLOWPACS": 30})
    assert s.quiet_for("SLOWPACS") == 30
    assert s.quiet_for("OTHER") == 2
    assert s.quiet_for(None) == 2
