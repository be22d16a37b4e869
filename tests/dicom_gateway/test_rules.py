"""Rule matching (each condition, regex, ranges, orientation, AE, case) and rule validation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dicom_gateway.errors import ConfigError
from dicom_gateway.route.rules import rule_matches, validate_rules
from dicom_gateway.route.series import SeriesSummary
from dicom_gateway.settings import Range, Rule, RuleMatch

CT = SeriesSummary(series_uid="1.2.3.1", modality="CT", body_part="CHEST", series_description="Lung 1.0 B60f",
                   series_number=3, slice_thickness=1.0, orientation="axial", n_instances=120, calling_ae="PACS",
                   sop_instance_uids=(), paths=())


@pytest.mark.parametrize(("match", "series", "ok", "reason"), [
    (RuleMatch(), CT, True, ""),
    (RuleMatch(modality=["CT"]), CT, True, ""),
    (RuleMatch(modality=["ct", "mr"]), CT, True, ""),
    (RuleMatch(modality=["CT"]), replace(CT, modality="MR"), False, "modality MR not in [CT]"),
    (RuleMatch(modality=["CT"]), replace(CT, modality=None), False, "modality missing (need one of [CT])"),
    (RuleMatch(body_part=["chest", "LUNG"]), CT, True, ""),
    (RuleMatch(body_part=["Chest"]), replace(CT, body_part="chest"), True, ""),
    (RuleMatch(body_part=["SPINE"]), CT, False, "body part CHEST not in [SPINE]"),
    (RuleMatch(body_part=["THORACOLUMBAR SPINE"]), replace(CT, body_part="Thoracolumbar Spine"), True, ""),
    (RuleMatch(series_description=r"lung|thorax"), CT, True, ""),
    (RuleMatch(series_description=r"^LUNG\s+1\.0"), CT, True, ""),
    (RuleMatch(series_description=r"\bB60f$"), CT, True, ""),
    (RuleMatch(series_description=r"soft"), CT, False, "series description does not match /soft/"),
    (RuleMatch(series_description=r"lung"), replace(CT, series_description=None), False,
     "series description does not match /lung/"),
    (RuleMatch(slice_thickness=Range(max=1.0)), CT, True, ""),  # inclusive
    (RuleMatch(slice_thickness=Range(min=1.0, max=3.0)), CT, True, ""),
    (RuleMatch(slice_thickness=Range(max=3.0)), replace(CT, slice_thickness=3.0000001), True, ""),
    (RuleMatch(slice_thickness=Range(max=3.0)), replace(CT, slice_thickness=5.0), False,
     "slice thickness 5 mm not in [, 3] mm"),
    (RuleMatch(slice_thickness=Range(min=2.0)), CT, False, "slice thickness 1 mm not in [2, ] mm"),
    (RuleMatch(slice_thickness=Range(max=3.0)), replace(CT, slice_thickness=None), False,
     "slice thickness unknown (need [, 3] mm)"),
    (RuleMatch(orientation=["axial", "coronal"]), CT, True, ""),
    (RuleMatch(orientation=["sagittal"]), CT, False, "orientation axial not in [sagittal]"),
    (RuleMatch(orientation=["axial"]), replace(CT, orientation="oblique"), False,
     "orientation oblique not in [axial]"),
    (RuleMatch(orientation=["axial"]), replace(CT, orientation=None), False,
     "orientation unknown (need one of [axial])"),
    (RuleMatch(calling_ae=["pacs", "MODALITY1"]), CT, True, ""),
    (RuleMatch(calling_ae=["OTHER"]), CT, False, "calling AE PACS not in [OTHER]"),
    (RuleMatch(min_slices=120), CT, True, ""),
    (RuleMatch(min_slices=121), CT, False, "120 images < min_slices 121"),
    (RuleMatch(modality=["MR"], orientation=["sagittal"]), CT, False,
     "modality CT not in [MR]; orientation axial not in [sagittal]"),
])
def test_rule_matches(match: RuleMatch, series: SeriesSummary, ok: bool, reason: str) -> None:
    assert rule_matches(match, series) == (ok, reason)


def test_all_conditions_together() -> None:
    match = RuleMatch(modality=["CT"], body_part=["CHEST"], series_description="lung",
                      slice_thickness=Range(min=0.5, max=3), orientation=["axial"], calling_ae=["PACS"],
                      min_slices=16)
    assert rule_matches(match, CT) == (True, "")


def test_validate_rules_accepts_good_rules() -> None:
    validate_rules([Rule(name="a", match=RuleMatch(series_description=r"(?i)lung\s*\d"), models=["m"]),
                    Rule(name="b", models=["m"])])


def test_invalid_regex_names_the_rule() -> None:
    rules = [Rule(name="good", models=["m"]),
             Rule(name="broken-rule", match=RuleMatch(series_description="lung(["), models=["m"])]
    with pytest.raises(ConfigError, match="broken-rule") as info:
        validate_rules(rules)
    assert "lung([" in str(info.value)


def test_duplicate_rule_names_refused() -> None:
    with pytest.raises(ConfigError, match="twice"):
        validate_rules([Rule(name="x", models=["m"]), Rule(name="x", models=["n"])])
