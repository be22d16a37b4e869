"""Routing rules and series selection as pure functions: data in, (answer, reason) out; no I/O.

Rules are data (docs/design.md): conditions are matched with sets, inclusive numeric ranges and Python
regular expressions (searched case-insensitively). Nothing from the configuration is evaluated.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Sequence

from dicom_gateway.errors import ConfigError
from dicom_gateway.route.series import SeriesSummary
from dicom_gateway.settings import Range, Rule, RuleMatch
from inference.model_card import ModelCard

_TOLERANCE_MM = 1e-6  # DS values such as "3.0000001" still satisfy max: 3.0


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a series-description pattern once (case-insensitive); raises re.error if invalid."""
    return re.compile(pattern, re.IGNORECASE)


def validate_rules(rules: Sequence[Rule]) -> None:
    """Check what pydantic cannot: unique rule names and valid regexes. Raises ConfigError naming the rule."""
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ConfigError(f"rule names must be unique: {rule.name!r} appears twice")
        seen.add(rule.name)
        pattern = rule.match.series_description
        if pattern is None:
            continue
        try:
            compile_pattern(pattern)
        except re.error as exc:
            raise ConfigError(f"rule {rule.name!r}: match.series_description {pattern!r} is not a valid"
                              f" regular expression: {exc}") from exc


def _fmt(values: Iterable[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _norm(value: str | None) -> str | None:
    return value.strip().upper() if value is not None and value.strip() else None


def _in_set(name: str, value: str | None, allowed: list[str]) -> str | None:
    """Case-insensitive membership; a reason string when it fails."""
    if _norm(value) is None:
        return f"{name} missing (need one of {_fmt(allowed)})"
    if _norm(value) not in {_norm(a) for a in allowed}:
        return f"{name} {value} not in {_fmt(allowed)}"
    return None


def _in_range(value: float | None, rng: Range) -> str | None:
    bounds = f"[{'' if rng.min is None else f'{rng.min:g}'}, {'' if rng.max is None else f'{rng.max:g}'}] mm"
    if value is None or not math.isfinite(value):
        return f"slice thickness unknown (need {bounds})"
    if rng.min is not None and value < rng.min - _TOLERANCE_MM:
        return f"slice thickness {value:g} mm not in {bounds}"
    if rng.max is not None and value > rng.max + _TOLERANCE_MM:
        return f"slice thickness {value:g} mm not in {bounds}"
    return None


def rule_matches(match: RuleMatch, s: SeriesSummary) -> tuple[bool, str]:
    """Whether series s meets every given condition of match (AND; lists are OR).

    Returns (True, "") or (False, reason) where reason names each failed condition, e.g.
    "modality MR not in [CT]". Modality, body part and calling AE compare case-insensitively.
    """
    failures: list[str] = []
    if match.modality is not None and (why := _in_set("modality", s.modality, match.modality)):
        failures.append(why)
    if match.body_part is not None and (why := _in_set("body part", s.body_part, match.body_part)):
        failures.append(why)
    if match.series_description is not None:
        pattern = compile_pattern(match.series_description)
        if not pattern.search(s.series_description or ""):
            failures.append(f"series description does not match /{match.series_description}/")
    if match.slice_thickness is not None and (why := _in_range(s.slice_thickness, match.slice_thickness)):
        failures.append(why)
    if match.orientation is not None:
        allowed = [o.lower() for o in match.orientation]
        if s.orientation is None:
            failures.append(f"orientation unknown (need one of {_fmt(allowed)})")
        elif s.orientation.lower() not in allowed:
            failures.append(f"orientation {s.orientation} not in {_fmt(allowed)}")
    if match.calling_ae is not None and (why := _in_set("calling AE", s.calling_ae, match.calling_ae)):
        failures.append(why)
    if match.min_slices is not None and s.n_instances < match.min_slices:
        failures.append(f"{s.n_instances} images < min_slices {match.min_slices}")
    return (not failures, "; ".join(failures))


def _wanted(card: ModelCard) -> str:
    prefs = card.series
    text = f"no {'/'.join(prefs.orientation)} {'/'.join(prefs.modalities)} series with ≥ {prefs.min_slices} slices"
    if prefs.max_slice_thickness_mm is not None:
        text += f" and thickness ≤ {prefs.max_slice_thickness_mm:g} mm"
    return text


def usable_for(card: ModelCard, s: SeriesSummary) -> bool:
    """Whether the model card's series preference admits series s."""
    prefs = card.series
    if _norm(s.modality) not in {_norm(m) for m in prefs.modalities}:
        return False
    if s.orientation is None or s.orientation.lower() not in {o.lower() for o in prefs.orientation}:
        return False
    if s.n_instances < prefs.min_slices:
        return False
    if prefs.max_slice_thickness_mm is not None:
        return s.slice_thickness is not None and s.slice_thickness <= prefs.max_slice_thickness_mm + _TOLERANCE_MM
    return True


def select_series(card: ModelCard, candidates: list[SeriesSummary]) -> tuple[SeriesSummary | None, str]:
    """Pick the one series the model reads (card.series): (series, "") or (None, reason).

    prefer "thinnest": smallest slice thickness, ties broken by most images; "most_slices": most
    images, ties broken by thinnest. Remaining ties go to the lowest series number, then UID.
    """
    usable = [s for s in candidates if usable_for(card, s)]
    if not usable:
        found = ", ".join(s.describe() for s in candidates) or "none"
        return None, f"{_wanted(card)}; found: {found}"

    def thickness(s: SeriesSummary) -> float:
        return s.slice_thickness if s.slice_thickness is not None else math.inf

    def tail(s: SeriesSummary) -> tuple[bool, int, str]:
        return (s.series_number is None, s.series_number or 0, s.series_uid)

    if card.series.prefer == "thinnest":
        best = min(usable, key=lambda s: (thickness(s), -s.n_instances, *tail(s)))
    else:
        best = min(usable, key=lambda s: (-s.n_instances, thickness(s), *tail(s)))
    return best, ""
