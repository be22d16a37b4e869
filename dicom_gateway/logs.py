"""Structured logging: JSON lines carrying UIDs and states, never patient names, IDs or birth dates.

Third-party messages quote attribute values: every record of the pydicom, highdicom and pynetdicom loggers,
and of Python warnings (pydicom warns about invalid values, quoting them), goes out redacted
(`inference.redaction.redact`: attribute names and the kind of error kept), as does a message formatted from an
exception, the `reason` field of every record and the message lines of every logged exception (`PhiFilter` on the
handler, `JsonFormatter`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import Any

from inference.redaction import redact

# Attributes a caller may attach with `extra={...}`; anything else passed as extra is dropped.
SAFE_FIELDS = ("study_uid", "series_uid", "sop_instance_uid", "job_id", "model", "state", "stage", "status",
               "calling_ae", "called_ae", "peer", "destination", "seconds", "count", "association_id", "reason")


REDACTED_LOGGERS = ("pydicom", "highdicom", "pynetdicom", "py.warnings")


def _from(name: str, loggers: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in loggers)


def _quotes_an_exception(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else (record.args,)
    return any(isinstance(a, BaseException) for a in args)


class PhiFilter(logging.Filter):
    """Redacts, in place, the message of records from `REDACTED_LOGGERS` or formatted from an exception
    (`log.warning("job failed: %s", exc)`: its text may be pydicom's or highdicom's) and the `reason` field of
    every record (installed on the handler, so records of every logger pass it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _from(record.name, REDACTED_LOGGERS) or _quotes_an_exception(record):
            record.msg, record.args = redact(record.getMessage()), ()
        reason = record.__dict__.get("reason")
        if isinstance(reason, str):
            record.reason = redact(reason)
        return True


def redacted_exception(exc_info: Any) -> str:
    """A traceback with the exception lines redacted (frames and source lines, which are our code, kept)."""
    lines = "".join(traceback.format_exception(*exc_info)).rstrip("\n").splitlines()
    return "\n".join(line if line.startswith((" ", "Traceback (most recent call last)")) else redact(line)
                     for line in lines)


class JsonFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging.Formatter's name
        return redacted_exception(ei)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in SAFE_FIELDS:
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger: message`, exceptions redacted as in JsonFormatter."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging.Formatter's name
        return redacted_exception(ei)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """One stderr handler on the root logger, JSON lines (or text), every record through `PhiFilter`; Python
    warnings (e.g. pydicom's about invalid values) become records of `py.warnings`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PhiFilter())
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs whole datasets at DEBUG (patient data): keep it at WARNING whatever our level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
