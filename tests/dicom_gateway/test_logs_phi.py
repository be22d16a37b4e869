"""The log handler redacts what pydicom, highdicom and pynetdicom say about values, Python warnings, every `reason`
and every exception's message: a data set with PHI canaries leaves no trace in the log."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator

import pydicom
import pytest
from pydicom import config

from dicom_gateway.logs import configure_logging
from tests.inference.test_redaction import leaked, write_canary_file


@pytest.fixture
def gateway_logging() -> Iterator[None]:
    """configure_logging as `dxgate serve` calls it; the test process's logging restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("pynetdicom").level)
    yield
    logging.captureWarnings(False)
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("pynetdicom").setLevel(saved[2])


def _records(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def _copy_every_value(path) -> None:  # noqa: ANN001
    """What an encoder does with a source's patient and study modules; pydicom warns about invalid values."""
    ds, copy = pydicom.dcmread(path), pydicom.Dataset()
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.keyword and elem.VR != "SQ":
            with contextlib.suppress(ValueError):   # 'CANARYWT' is no number: pydicom has warned and logged
                setattr(copy, elem.keyword, elem.value)


def test_pydicom_logger_and_warnings_are_redacted(tmp_path, capsys, gateway_logging) -> None:  # noqa: ANN001
    path = write_canary_file(tmp_path / "canary.dcm")
    configure_logging("INFO", "json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _copy_every_value(path)
    records = _records(capsys.readouterr().err)
    by_logger = {r["logger"] for r in records}
    assert {"pydicom", "py.warnings"} <= by_logger, by_logger     # both paths were taken, and both logged
    text = "\n".join(r["msg"] for r in records)
    assert "Invalid value for VR DA: …" in text and "Invalid value for VR AS: …" in text
    assert not leaked(json.dumps(records)), text


def test_reason_and_exceptions_of_every_logger_are_redacted(tmp_path, capsys, gateway_logging) -> None:  # noqa: ANN001
    path = write_canary_file(tmp_path / "canary.dcm")
    configure_logging("INFO", "json")
    log = logging.getLogger("dicom_gateway.work.worker")
    log.warning("job failed", extra={"job_id": 7, "reason": "ValueError: Invalid value for VR PN: 'CANARY^PHI'"})
    previous = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        pydicom.dcmread(path).PatientWeight    # noqa: B018 - raises, quoting the value
    except ValueError:
        log.exception("job failed unexpectedly", extra={"job_id": 8})
    finally:
        config.settings.reading_validation_mode = previous
    log.warning("job failed: %s", ValueError("cannot build SEG: Unable to convert '1901-02-03' to 'DA' object"))
    logging.getLogger("highdicom.sr.sop").warning("Patient's Birth Date '19010203' copied from the source")
    logging.getLogger("pynetdicom.events").error("Invalid value for VR LO: 'PHI-CANARY-ID'")
    records = _records(capsys.readouterr().err)
    assert [r["msg"] for r in records] == ["job failed", "job failed unexpectedly",
                                          "job failed: cannot build SEG: Unable to convert … to 'DA' object",
                                          "Patient's Birth Date … copied from the source",
                                          "Invalid value for VR LO: …"]
    assert records[0]["reason"] == "ValueError: Invalid value for VR PN: …" and records[0]["job_id"] == 7
    exc = records[1]["exc"]
    assert exc.startswith("Traceback (most recent call last)")
    assert "ValueError: could not convert string to float: …" in exc
    assert 'File "' in exc                                   # frames kept: the traceback still helps
    assert not leaked(json.dumps(records)), records


def test_the_text_format_is_redacted_too(tmp_path, capsys, gateway_logging) -> None:  # noqa: ANN001
    path = write_canary_file(tmp_path / "canary.dcm")
    configure_logging("INFO", "text")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _copy_every_value(path)
    err = capsys.readouterr().err
    assert "pydicom: Invalid value for VR DA: …" in err
    assert not leaked(err), err


def test_our_own_messages_are_left_alone(capsys, gateway_logging) -> None:  # noqa: ANN001
    configure_logging("INFO", "json")
    logging.getLogger("dicom_gateway.send.sender").info("sent 'SR' to <PACS>", extra={"destination": "pacs"})
    (record,) = _records(capsys.readouterr().err)
    assert record["msg"] == "sent 'SR' to <PACS>" and record["destination"] == "pacs"
