"""Tiny variants of the shipped training recipes (training/configs/): the shipped file with its steps, cases and
sizes overridden, so a test trains and registers what the recipe describes in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "training" / "configs"
FIRST_STAGE = {"lung-nodule": "lung_nodule.yaml", "spine-vertebrae": "spine_vertebrae.yaml"}
SECOND_STAGE = "lung_nodule_candidates.yaml"
TINY_CT = {"rows": 128, "slices": 40, "n_neg": 60}      # a second-stage round's generated CTs
TINY_EVAL_CT = {"rows": 128, "slices": 60}              # its calibration and held-out CTs


def shipped(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


def tiny_first_stage(task: str, root: Path, **overrides: Any) -> Path:
    """The shipped config of `task` on the built-in phantom: 3 steps on 16 x 32 x 32 patches, one training, validation
    and calibration case, two held-out cases, registered under root/models; written to root/<config name>."""
    cfg = shipped(FIRST_STAGE[task])
    cfg.update(roi_size=[16, 32, 32], steps=3, val_every=3, benchmark=False, run_dir=str(root / "run"),
               register_to=str(root / "models"))
    cfg["data"].update(dir=str(root / "data"), n_train=1, n_val=1, n_test=2, phantom=True,
                       n_calibration=1 if cfg["data"].get("n_calibration") else 0)
    cfg.update(overrides)
    path = root / FIRST_STAGE[task]
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_second_stage(root: Path, rounds: list[dict[str, Any]], **overrides: Any) -> Path:
    """The shipped second-stage config with `rounds` (each over the shipped round of its position) on small generated
    CTs, two calibration and two held-out CTs under root/eval; written to root/lung_nodule_candidates.yaml."""
    cfg = shipped(SECOND_STAGE)
    cfg["rounds"] = [{**{k: v for k, v in cfg["rounds"][i].items() if k not in ("steps", "minutes")}, **TINY_CT, **r}
                     for i, r in enumerate(rounds)]
    cfg["calibration"].update(dir=str(root / "eval"), n=2, **TINY_EVAL_CT)
    cfg["test"] = [{**cfg["test"][0], "dir": str(root / "eval"), "n": 2, **TINY_EVAL_CT}]
    cfg.update({"run_dir": str(root / "run_second"), "batch_size": 64, **overrides})
    path = root / SECOND_STAGE
    path.write_text(yaml.safe_dump(cfg))
    return path
