"""Structured logging: JSON lines carrying UIDs and states, never patient names, IDs or birth dates."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes a caller may attach with `extra={...}`; anything else passed as extra is dropped.
SAFE_FIELDS = ("study_uid", "series_uid", "sop_instance_uid", "job_id", "model", "state", "stage", "status",
               "calling_ae", "destination", "seconds", "count", "association_id", "reason")


class JsonFormatter(logging.Formatter):
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


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs whole datasets at DEBUG (patient data): keep it at WARNING whatever our level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
