"""Model folders prepared for tests and benchmarks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def operating_point_copy(models_dir: Path, study_files: list[Path], out: Path) -> Path:
    """A copy of the lung model whose probability threshold sits below its maximum on this study
    (0.8 x: mapping back to the source grid interpolates, which lowers a one-voxel peak).

    This test is about the delivery path (SR + SEG + GSPS into the same study), not about accuracy, so
    it must not depend on how well the weights are trained: whatever they are, the study yields at least
    one finding. The Orthanc test keeps the shipped card and covers the study with no finding.
    """
    import numpy as np

    from inference.backends.factory import make_backend
    from inference.model_pass import model_logits
    from inference.model_repo import load_model
    from inference.preprocess import preprocess
    from inference.volume import load_series

    shutil.copytree(models_dir / "lung_nodule_ct", out / "lung_nodule_ct")
    model = load_model(out / "lung_nodule_ct")
    backend = make_backend(model)
    card = model.card
    image, _ = preprocess(load_series(study_files), card)
    logits = model_logits(image, backend, card)
    backend.close()
    top = float(1.0 / (1.0 + np.exp(-logits[0].max())))
    meta = json.loads((out / "lung_nodule_ct" / "metadata.json").read_text())
    meta["thresholds"] = {**meta.get("thresholds", {}), "probability": max(min(0.8 * top, 0.99), 1e-3),
                          "min_diameter_mm": 0.0, "min_volume_mm3": 0.0, "min_mean_hu": None, "max_mean_hu": None}
    (out / "lung_nodule_ct" / "metadata.json").write_text(json.dumps(meta, indent=1))
    return out
