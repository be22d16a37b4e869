"""Messages of pydicom, highdicom and dciodvfy reduced to tag names and the kind of error (no values).

Their messages quote attribute values (a patient's name, a birth date) in `<...>`, quotes or after
"value"; those must not reach logs, job reasons or API bodies. `redact` keeps DICOM keywords, tags
like (0010,0030), UIDs-free structure and the wording of the error, and replaces every value with `…`.
"""

from __future__ import annotations

import re

from pydicom.datadict import tag_for_keyword

REDACTED = "…"

_ANGLED = re.compile(r"<([^<>\n]*)>")
_QUOTED = re.compile(r"""b?'(?:[^'\\\n]|\\.)*'|b?"(?:[^"\\\n]|\\.)*\"""")
_AFTER_EQUALS = re.compile(r"(\[\d+\]\s*=\s*)(\S[^\n]*?)(?=\s+-\s|$)")


def _keep_keyword(match: re.Match[str]) -> str:
    inner = match.group(1)
    if inner and tag_for_keyword(inner) is not None:
        return match.group(0)  # <PatientBirthDate> names an attribute; keep it
    return f"<{REDACTED}>"


def redact(message: str) -> str:
    """`message` with every quoted or bracketed value replaced by `…` (keywords and tags kept)."""
    text = _ANGLED.sub(_keep_keyword, message)
    text = _QUOTED.sub(REDACTED, text)
    return _AFTER_EQUALS.sub(lambda m: m.group(1) + REDACTED, text)
