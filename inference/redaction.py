"""Messages of pydicom, highdicom, decoders and dciodvfy reduced to attribute names and the kind of error.

Their messages quote attribute values (a patient's name, a birth date): dciodvfy in `<...>` (and the offending
character as `'9' (0x39)`), pydicom and Python in quotes (`Invalid value for VR DA: '19010203'`), data element
reprs after the VR (`PN: CANARY^PHI`). Those must not reach logs, job reasons or API bodies. `redact` replaces
every such value with `…` and keeps what names an attribute: DICOM keywords (`<PatientBirthDate>`), dictionary
names (`<Patient's Sex>`), VRs (`'DA'`), dciodvfy's `Element=<...>` / `Module=<...>`, tags like (0010,0030), and the
wording. A value that is itself a keyword, a name or a VR (a patient called 'DA') is kept: such words identify
no one.
"""

from __future__ import annotations

import re
from functools import cache

from pydicom.datadict import DicomDictionary, tag_for_keyword

REDACTED = "…"

_NAMED = ("Element=", "Module=", "Macro=", "Attribute=")   # dciodvfy: what follows names an attribute or module
_VRS = ("AE|AS|AT|CS|DA|DS|DT|FL|FD|IS|LO|LT|OB|OD|OF|OL|OV|OW|PN|SH|SL|SQ|SS|ST|SV|TM|UC|UI|UL|UN|UR|US|UT|UV")
_VR_NAMES = frozenset(_VRS.split("|"))
# one pass, left to right: an angled span, or a quoted one whose quotes are not apostrophes inside a word
_SPAN = re.compile(
    r"(?P<angled><(?P<inner>[^<>\n]*)>)"
    r"""|(?P<quoted>(?<![\w'])b?'(?:[^'\\\n]|\\.|'(?=\w))*'(?!\w)|(?<!\w)b?"(?:[^"\\\n]|\\.)*")"""
)
_CHAR_CODE = re.compile(re.escape(REDACTED) + r"\s*\(0x[0-9A-Fa-f]{1,8}\)")   # dciodvfy: = '9' (0x39)
_AFTER_EQUALS = re.compile(r"(\[\d+\]\s*=\s*)(?!<?" + re.escape(REDACTED) + r")(\S[^\n]*?)(?=\s+-\s|$)", re.M)
_AFTER_VR = re.compile(r"(\b(?:" + _VRS + r"):[ \t]+)(?!" + re.escape(REDACTED) + r")(\S[^\n]*)")


@cache
def _attribute_names() -> frozenset[str]:
    """Every keyword and name of the DICOM data dictionary (PS3.6), e.g. PatientSex and Patient's Sex."""
    return frozenset(name for entry in DicomDictionary.values() for name in (entry[2], entry[4]) if name)


def _is_attribute_name(text: str) -> bool:
    """A keyword, a dictionary name or a VR (`Unable to convert … to 'DA'`): words of the message, not values."""
    return bool(text) and (text in _attribute_names() or text in _VR_NAMES or tag_for_keyword(text) is not None)


def _span(message: str, match: re.Match[str]) -> str:
    if match.group("angled") is not None:
        inner = match.group("inner")
        before = message[max(0, match.start() - 12):match.start()]
        if _is_attribute_name(inner) or before.endswith(_NAMED):
            return match.group(0)
        return f"<{REDACTED}>"
    quoted = match.group("quoted")
    inner = quoted.lstrip("b")[1:-1]
    return quoted if _is_attribute_name(inner) else REDACTED


def redact(message: str) -> str:
    """`message` with every quoted, bracketed or element value replaced by `…` (attribute names, tags and the
    kind of error kept). Idempotent."""
    text = _SPAN.sub(lambda m: _span(message, m), message)
    text = _CHAR_CODE.sub(REDACTED, text)
    text = _AFTER_EQUALS.sub(lambda m: m.group(1) + REDACTED, text)
    return _AFTER_VR.sub(lambda m: m.group(1) + REDACTED, text)
