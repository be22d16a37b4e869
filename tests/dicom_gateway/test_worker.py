"""The worker: a claimed job becomes validated SR (+ SEG/GSPS) in the outbox, or FAILED with its stage."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_gateway.server import load_models
from dicom_gateway.settings import Destination, Settings
from dicom_gateway.store import Store
from dicom_gateway.work.worker import Worker
from harness.ct import build_ct_series
from tests.dicom_gateway.stores import ingest


@pytest.fixture
def setup(tmp_path: Path, smoke_models_dir: Path):  # noqa: ANN201
    settings = Settings(data_dir=tmp_path / "var", models_dir=smoke_models_dir,
                        destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1,
                                                  overlay="sc")])
    (tmp_path / "spool").mkdir()
    store = Store(settings.db_path)
    models = load_models(settings)
    return settings, store, models, tmp_path / "spool"


def _job(store: Store, datasets: list[pydicom.Dataset], uids: list[str], model: str = "lung_nodule_ct") -> int:
    job_id, _ = store.jobs.create(study_uid=datasets[0].StudyInstanceUID, model=model, model_version="1",
                                  series_uid=datasets[0].SeriesInstanceUID, input_uids=uids,
                                  destinations=["pacs"], rule="chest")
    return job_id


def test_job_is_encoded_validated_and_written_to_outbox(setup) -> None:  # noqa: ANN001
    settings, store, models, spool = setup
    datasets = build_ct_series(24)
    # a bright sphere, so a few-step model has something to find (the result need not be a finding)
    for i, ds in enumerate(datasets):
        hu = np.frombuffer(ds.PixelData, dtype=np.int16).reshape(ds.Rows, ds.Columns).copy()
        yy, xx = np.mgrid[0:ds.Rows, 0:ds.Columns]
        hu[((yy - 30) ** 2 + (xx - 30) ** 2 + ((i - 12) * 3.5) ** 2) < 64] = 60
        ds.PixelData = hu.tobytes()
    job_id = _job(store, datasets, ingest(store, spool, datasets))
    assert Worker(settings, store, models).run_once()
    job = store.jobs.get(job_id)
    assert job["state"] == "ENCODED", (job["failed_stage"], job["reason"])
    stages = json.loads(job["stage_seconds"])
    assert {"load", "preprocess", "infer", "postprocess", "encode", "validate"} <= set(stages)
    outputs = json.loads(job["outputs"])
    kinds = [o["kind"] for o in outputs]
    assert kinds[0] == "sr"
    assert ("seg" in kinds) == (job["findings"] > 0) and ("sc" in kinds) == (job["findings"] > 0)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(outputs[0]["path"]))
    assert sr.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert job["weights_sha256"].encode() in Path(outputs[0]["path"]).read_bytes()  # algorithm identification
    assert [d["destination"] for d in store.deliveries.of_job(job_id)] == ["pacs"]


def test_missing_spool_file_fails_at_load_stage(setup) -> None:  # noqa: ANN001
    settings, store, models, spool = setup
    datasets = build_ct_series(20)
    uids = ingest(store, spool, datasets)
    (spool / f"{uids[3]}.dcm").unlink()
    job_id = _job(store, datasets, uids)
    Worker(settings, store, models).run_once()
    job = store.jobs.get(job_id)
    assert job["state"] == "FAILED" and job["failed_stage"] == "load"
    assert "missing from the spool" in job["reason"]


def test_wrong_modality_fails_with_a_clear_reason(setup) -> None:  # noqa: ANN001
    settings, store, models, spool = setup
    datasets = build_ct_series(20)
    for ds in datasets:
        ds.Modality = "MR"
    job_id = _job(store, datasets, ingest(store, spool, datasets))
    Worker(settings, store, models).run_once()
    job = store.jobs.get(job_id)
    assert job["state"] == "FAILED" and job["failed_stage"] == "load"
    assert "MR" in job["reason"]


def test_unknown_model_fails_at_load_model(setup) -> None:  # noqa: ANN001
    settings, store, models, spool = setup
    datasets = build_ct_series(20)
    job_id = _job(store, datasets, ingest(store, spool, datasets), model="not_installed")
    Worker(settings, store, models).run_once()
    job = store.jobs.get(job_id)
    assert job["state"] == "FAILED" and job["failed_stage"] == "load_model"
