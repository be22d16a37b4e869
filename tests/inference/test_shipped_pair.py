"""The shipped lung pair serves the same findings, SR, SEG and GSPS as recorded in `shipped_pair.json`.

`shipped_pair.json` holds `tests.inference.served_outputs.summary` of what the shipped models serve on a
synthetic chest CT (`served_outputs.CASES`): the findings with their centres, diameters, probabilities and the
model that produced each, the SR content tree (measurement groups, TID 4019 algorithm identification per
finding), the SEG segments with their algorithm identification and label volume, the GSPS annotations. It was
written by `python -m tests.inference.served_outputs tests/inference/shipped_pair.json` with the runner built as
the gateway built it when the classifier's card named the lung model as its first stage; rewrite it only when the
served output is meant to change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.inference.served_outputs import CASES, REPO_MODELS, served, write_case

EXPECTED = json.loads((Path(__file__).with_name("shipped_pair.json")).read_text(encoding="utf-8"))


def assert_same(actual: Any, expected: Any, where: str = "") -> None:
    """Equal, floats to 1e-6 relative (ONNX Runtime's float32 sums may round differently on another CPU)."""
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-6, abs=1e-9), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: keys {sorted(actual)}"
        for key, value in expected.items():
            assert_same(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual} != {expected}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


@pytest.mark.parametrize(("case", "model", "writer", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_the_shipped_models_serve_what_they_served(case, model, writer, kwargs, tmp_path: Path) -> None:
    if not all((REPO_MODELS / m / "metadata.json").is_file() for m in ("lung_nodule_ct", "lung_nodule_candidates_ct")):
        pytest.skip("the shipped lung pair is not in models/")
    got = served(REPO_MODELS, model, write_case(writer, tmp_path / case, kwargs))
    expected = EXPECTED[case]
    # the parts a reader checks first, then everything
    assert [f["algorithm"] for f in got["findings"]] == [f["algorithm"] for f in expected["findings"]]
    assert {f["algorithm"] for f in got["findings"]} == {"lung_nodule_ct", "lung_nodule_candidates_ct"}
    assert_same(got["findings"], expected["findings"], "findings")
    assert_same(got["seg"]["segments"], expected["seg"]["segments"], "seg.segments")
    assert_same(got, expected, case)
