"""A small but real model folder for tests: a few training steps through the real pipeline.

`build_smoke_model` trains a tiny U-Net for `steps` steps on tiny phantom volumes with the same
transforms, loss, export, parity check and registration as the shipped models, so the gateway's tests
exercise a genuine `models/<name>/` folder in seconds. Its findings are meaningless.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from training.config import DataConfig, TrainConfig
from training.register import card_fields_for, register_model
from training.train import train

_TASKS = {"lung_nodule_ct": "lung-nodule", "spine_vertebrae_ct": "spine-vertebrae"}


def smoke_config(name: str, work: Path, steps: int = 30, seed: int = 0) -> TrainConfig:
    """The tiny training configuration used by `build_smoke_model` (phantom data, 3 mm grid)."""
    if name not in _TASKS:
        raise ValueError(f"unknown smoke model {name!r}; expected one of {sorted(_TASKS)}")
    task = _TASKS[name]
    return TrainConfig(
        task=task, name=name,
        data=DataConfig(dir=work / "data", n_train=2, n_val=1, n_test=0, seed=seed, val_seed=seed + 100,
                        phantom=True),
        spacing_mm=(3.0, 3.0, 3.0),
        window=(-1000.0, 400.0) if task == "lung-nodule" else (-500.0, 1300.0),
        roi_size=(16, 32, 32), channels=(4, 8, 16), num_res_units=1, steps=steps, batch_size=1,
        num_samples=2, lr=5e-3, val_every=max(1, steps), seed=seed, run_dir=work / "run", resume=False,
    )


def build_smoke_model(models_dir: Path, name: str = "lung_nodule_ct", steps: int = 30, seed: int = 0) -> Path:
    """Train, export, check parity and register a tiny model as models_dir/<name>/; returns the folder.

    `name` is "lung_nodule_ct" or "spine_vertebrae_ct". Runs in a few seconds on 2 CPU cores.
    """
    with tempfile.TemporaryDirectory(prefix="dxgate-smoke-") as tmp:
        cfg = smoke_config(name, Path(tmp), steps=steps, seed=seed)
        result = train(cfg, progress=False)
        fields = card_fields_for(
            cfg.task, name=name,
            description="SMOKE-TEST MODEL trained for a few steps on phantoms; its output is meaningless.",
            input={"name": "image", "spacing_mm": cfg.spacing_mm, "window": cfg.window,
                   "roi_size": cfg.roi_size, "overlap": cfg.overlap, "batch_size": 1},
            training={"data": "phantom (training.datasets.phantom_case)", "seed": seed, "steps": result.step,
                      "command": f"python -c 'from training.smoke_model import build_smoke_model; "
                                 f"build_smoke_model(Path(...), {name!r}, steps={steps}, seed={seed})'",
                      "purpose": "tests only"},
            metrics={"final_loss": result.history[-1]["loss"], "val_dice": result.best_metric},
        )
        return register_model(result.net, fields, models_dir)
