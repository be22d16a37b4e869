"""Routing: which models read which series of a study, and where the results go. Pure; no I/O.

A rule matches a study when ANY of its series meets the rule's conditions. Every matching rule adds
its models; each model's card then picks one series among those that matched the rule. A series
whose headers show images missing (assemble.evidence) is never routed: its reason is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicom_gateway.route.rules import rule_matches, select_series
from dicom_gateway.route.series import SeriesSummary
from dicom_gateway.settings import Rule
from inference.model_repo import RegisteredModel, composing_models


@dataclass
class RoutingDecision:
    """One job to create: a model (and version) reads one series; results go to destinations."""

    model: str
    model_version: str
    series: SeriesSummary
    destinations: list[str]
    rule: str  # the rule's name; "a, b" when several rules chose the same model


def _why_no_series_matched(rule: Rule, series: Sequence[SeriesSummary]) -> str:
    """One reason per distinct failure; the series are named only when the reasons differ."""
    if not series:
        return f"rule {rule.name}: the study has no series"
    groups: dict[str, list[str]] = {}
    for s in series:
        _, why = rule_matches(rule.match, s)
        groups.setdefault(why, []).append(s.label())
    if len(groups) == 1:
        return f"rule {rule.name}: {next(iter(groups))}"
    parts = [f"{why} (series {', '.join(labels)})" for why, labels in groups.items()]
    return f"rule {rule.name}: " + "; ".join(parts)


def usable_series(series: Sequence[SeriesSummary]) -> tuple[list[SeriesSummary], list[str]]:
    """(the series routing may use, a reason per series left out because its images are incomplete)."""
    usable, reasons = [], []
    for s in series:
        why = s.evidence.reason if s.evidence is not None else None
        if why is None:
            usable.append(s)
        else:
            reasons.append(f"{why} (series {s.label()})")
    return usable, reasons


def _union(first: list[str], more: Sequence[str]) -> list[str]:
    return first + [d for d in more if d not in first]


def route_study(rules: Sequence[Rule], models: Mapping[str, RegisteredModel], series: Sequence[SeriesSummary],
                all_destinations: Sequence[str]) -> tuple[list[RoutingDecision], list[str]]:
    """Decide the jobs for one study: (decisions, reasons).

    reasons explain every rule that did not match and every model that could not run (not installed,
    or no usable series); callers record them when there are no decisions. A model chosen by several
    rules gives one decision (the first rule's series) with the union of the destinations. Incomplete
    series are left out first, each with its reason ("incomplete series: 60 of 120 images (series ...)").
    """
    decisions: dict[str, RoutingDecision] = {}
    series, reasons = usable_series(series)
    if not series and reasons:
        return [], reasons
    if not rules:
        return [], [*reasons, "no routing rule configured"]
    for rule in rules:
        matched = [s for s in series if rule_matches(rule.match, s)[0]]
        if not matched:
            reasons.append(_why_no_series_matched(rule, series))
            continue
        destinations = list(dict.fromkeys(rule.destinations or all_destinations))
        if not destinations:  # still run the model: results stay in the outbox, visible in the API
            reasons.append(f"rule {rule.name}: no destinations configured; results kept in the outbox")
        for name in rule.models:
            model = models.get(name)
            if model is None:
                reasons.append(f"rule {rule.name}: model {name} not installed")
                continue
            if not model.card.runs_alone:
                owners = ", ".join(composing_models(name, models)) or "another model"
                reasons.append(f"rule {rule.name}: model {name} runs only as a stage of {owners}, which runs it; "
                               "route to that model")
                continue
            chosen, why = select_series(model.card, matched)
            if chosen is None:
                reasons.append(f"rule {rule.name}: model {name}: {why}")
                continue
            if name in decisions:
                earlier = decisions[name]
                earlier.destinations = _union(earlier.destinations, destinations)
                if rule.name not in earlier.rule.split(", "):
                    earlier.rule = f"{earlier.rule}, {rule.name}"
                continue
            decisions[name] = RoutingDecision(model=name, model_version=model.version, series=chosen,
                                              destinations=list(destinations), rule=rule.name)
    return list(decisions.values()), reasons
