"""Fault injection, one case per `Stage`: the stage fails, its work ends with that stage and a clear reason,
and the next study runs to DONE on the same components.

The gateway's real components run in this process, driven one step at a time: the Storage SCP (fed by
dcmtk storescu), assembly and routing, the Worker with the models the gateway serves, the Sender to a
real dcmtk storescp. A fault is the function the stage runs raising its error (monkeypatched for study A
only), or input that fails there. Job stages (`JOB_STAGES`) end the job FAILED with `failed_stage`;
the stages before a job exists (`STUDY_STAGES`) fail the C-STORE (receive: a refusal status, nothing
recorded) or the study (route: UNROUTED with the reason).
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_gateway.assemble.completeness import mark_ready_studies, route_ready_studies
from dicom_gateway.errors import DeliveryError
from dicom_gateway.receive.scp import StorageSCP
from dicom_gateway.receive.spool import Spool
from dicom_gateway.send.sender import Sender
from dicom_gateway.server import load_models
from dicom_gateway.settings import Destination, Rule, RuleMatch, SenderSettings, Settings
from dicom_gateway.states import JOB_STAGES, STUDY_STAGES, JobState, Stage, StudyState
from dicom_gateway.store import Store
from dicom_gateway.work.worker import LoadedModel, Worker
from harness.ct import build_ct_series
from harness.dcmtk import StoreSCP, run_storescu, start_storescp
from harness.system import free_port
from inference.errors import EncodeError, ValidationFailedError
from inference.postprocess import PostprocessError
from inference.preprocess import PreprocessError

pytestmark = pytest.mark.integration

MODEL = "lung_nodule_ct"
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "PatientBirthDate": "19610203"}


@dataclass
class Line:
    """One gateway's components, in this process, over one job store."""

    settings: Settings
    store: Store
    spool: Spool
    scp: StorageSCP
    models: dict[str, LoadedModel]
    dest: StoreSCP
    tmp: Path
    registered: dict[str, Any] = field(init=False)  # what routing knows: every model installed at the start
    studies: int = 0

    def __post_init__(self) -> None:
        self.registered = {n: m.model for n, m in self.models.items()}

    @property
    def runner(self) -> Any:
        return self.models[MODEL].runner

    def write_study(self) -> tuple[str, list[Path]]:
        """A new small synthetic chest CT (24 slices of 64x64) with identifiable patient attributes."""
        self.studies += 1
        folder = self.tmp / f"study{self.studies}"
        folder.mkdir()
        paths = []
        for ds in build_ct_series(24):
            for keyword, value in PATIENT.items():
                setattr(ds, keyword, value)
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID), paths

    def receive(self, paths: list[Path]) -> str:
        """C-STORE with dcmtk storescu; its verbose output (one response line per file)."""
        res = run_storescu(paths, self.scp.port, self.settings.ae_title, "PACS", verbose=True)
        return res.stdout + res.stderr

    def settle(self, study_uid: str, timeout_s: float = 60.0) -> None:
        """Assemble, route, work and send until the study's work is finished (or it never became a study)."""
        worker = Worker(self.settings, self.store, self.models)
        sender = Sender(self.settings, self.store)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            mark_ready_studies(self.settings, self.store)
            route_ready_studies(self.settings, self.store, self.registered)
            busy = worker.run_once()
            busy = sender.run_once() > 0 or busy
            study = self.store.studies.get(study_uid)
            if study is None or study["state"] == StudyState.UNROUTED:
                return
            jobs = self.store.jobs.find(study_uid=study_uid)
            if not busy and jobs and all(j["state"] in (JobState.DONE, JobState.FAILED) for j in jobs):
                return
            time.sleep(0.02)  # the association's release is recorded by the SCP's thread
        raise AssertionError(f"study {study_uid} did not settle: {[dict(j) for j in self.store.jobs.find()]}")

    def job_of(self, study_uid: str) -> Any:
        (job,) = self.store.jobs.find(study_uid=study_uid)
        return job

    def delivered_sops(self) -> set[str]:
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.dest.files()}


@pytest.fixture(scope="module")
def models(gateway_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    return load_models(Settings(data_dir=tmp_path_factory.mktemp("models-var"), models_dir=gateway_models))


@pytest.fixture(scope="module")
def dest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    scp = start_storescp(tmp_path_factory.mktemp("dest") / "in", "DEST")
    yield scp
    scp.stop()


@pytest.fixture
def line(tmp_path: Path, gateway_models: Path, models: dict[str, LoadedModel], dest: StoreSCP) -> Iterator[Line]:
    settings = Settings(
        data_dir=tmp_path / "var", models_dir=gateway_models, dicom_port=free_port(), quiet_seconds=0,
        network_timeout_s=5, fsync=False,
        destinations=[Destination(name="dest", ae_title=dest.ae_title, host="127.0.0.1", port=dest.port)],
        rules=[Rule(name="chest", match=RuleMatch(modality=["CT"], body_part=["CHEST"]), models=[MODEL],
                    destinations=["dest"])],
        sender=SenderSettings(max_attempts=1, timeout_s=5))
    store = Store(settings.db_path, durable=False)
    spool = Spool(settings.spool_dir, fsync=False)
    scp = StorageSCP(settings, store, spool)
    scp.start()
    yield Line(settings, store, spool, scp, models, dest, tmp_path)
    scp.stop()
    store.close()


# -- the faults: each installs its fault on `mp` and returns the text the reason must carry -----------------
def _raise(exc: BaseException) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc
    return fail


def _patch_worker_import(mp: pytest.MonkeyPatch, module: str, name: str, exc: BaseException) -> None:
    """Patch a function the worker calls, where it looks it up (its module, and the worker if imported there)."""
    import dicom_gateway.work.worker as worker

    mp.setattr(f"{module}.{name}", _raise(exc))
    if hasattr(worker, name):
        mp.setattr(worker, name, _raise(exc))


def fault_load_model(line: Line, mp: pytest.MonkeyPatch, paths: list[Path]) -> str:
    mp.delitem(line.models, MODEL)  # routing knows the model; the worker has not loaded it
    return f"model {MODEL!r} is not loaded"


def fault_load(line: Line, mp: pytest.MonkeyPatch, paths: list[Path]) -> str:
    victim = sorted(line.spool.root.rglob("*.dcm"))[5]
    victim.unlink()  # input: a spooled file lost before the job runs
    return "input file(s) missing from the spool"


def fault_preprocess(line: Line, mp: pytest.MonkeyPatch, paths: list[Path]) -> str:
    mp.setattr(line.runner, "preprocessor", _raise(PreprocessError("resampled grid is empty")))
    return "PreprocessError: resampled grid is empty"


def fault_infer(line: Line, mp: pytest.MonkeyPatch, paths: list[Path]) -> str:
    mp.setattr(line.runner.backend, "infer", _raise(RuntimeError("device out of memory")))
    return "BackendError: infer: RuntimeError: device out of memory"


def fault_postprocess(line: Line, mp: pytest.MonkeyPatch, paths: list[Path]) -> str:
    mp.setattr("inference.pipeline.postprocess", _raise(PostprocessError("label map has the wrong shape")))
    return "PostprocessError: label map has the wrong shape"


def fault_encode(line: Line, mp: pytest.MonkeyPatch, paths: list[Path]) -> str:
    _patch_worker_import(mp, "inference.encode", "encode_sr", EncodeError("SR content tree rejected"))
    return "EncodeError: SR content tree rejected"


def fault_validate(line: Line, mp: pytest.MonkeyPatch, paths: list[Path]) -> str:
    _patch_worker_import(mp, "inference.validation", "validate_output",
                         ValidationFailedError("dciodvfy: Error - Missing attribute Type 1 Required Element"))
    return "ValidationFailedError: SR failed validation: dciodvfy: Error - Missing attribute"


def fault_send(line: Line, mp: pytest.MonkeyPatch, paths: list[Path]) -> str:
    mp.setattr("dicom_gateway.send.sender.store_datasets_or_files",
               _raise(DeliveryError("C-STORE association rejected by DEST")))
    return "undeliverable to dest: C-STORE association rejected by DEST"


JOB_FAULTS: dict[Stage, Callable[[Line, pytest.MonkeyPatch, list[Path]], str]] = {
    Stage.LOAD_MODEL: fault_load_model, Stage.LOAD: fault_load, Stage.PREPROCESS: fault_preprocess,
    Stage.INFER: fault_infer, Stage.POSTPROCESS: fault_postprocess, Stage.ENCODE: fault_encode,
    Stage.VALIDATE: fault_validate, Stage.SEND: fault_send,
}


def test_every_stage_has_a_fault_case() -> None:
    assert set(JOB_FAULTS) == set(JOB_STAGES)
    assert set(JOB_FAULTS) | STUDY_STAGES == set(Stage)


def _assert_no_patient_data(text: str | None) -> None:
    assert text, "a failure needs a reason"
    for value in PATIENT.values():
        assert value not in text and value.replace("^", " ") not in text, text


def _assert_next_study_done(line: Line) -> None:
    """With the fault gone, a new study runs through every stage to DONE and reaches the destination."""
    study_uid, paths = line.write_study()
    line.receive(paths)
    line.settle(study_uid)
    job = line.job_of(study_uid)
    assert job["state"] == JobState.DONE, (job["failed_stage"], job["reason"])
    outputs = {o["sop_instance_uid"] for o in json.loads(job["outputs"])}
    assert outputs and outputs <= line.delivered_sops()


@pytest.mark.parametrize("stage", list(Stage), ids=str)
def test_a_failing_stage_fails_its_work_and_the_next_study_runs(line: Line, stage: Stage) -> None:
    study_uid, paths = line.write_study()
    before = line.delivered_sops()
    with pytest.MonkeyPatch.context() as mp:
        if stage == Stage.RECEIVE:
            _receive_fails(line, mp, study_uid, paths)
        elif stage == Stage.ROUTE:
            _route_fails(line, mp, study_uid, paths)
        else:
            _job_stage_fails(line, mp, stage, study_uid, paths)
    if stage != Stage.SEND:
        assert line.delivered_sops() == before  # nothing of the failed study went out
    _assert_next_study_done(line)


def _job_stage_fails(line: Line, mp: pytest.MonkeyPatch, stage: Stage, study_uid: str, paths: list[Path]) -> None:
    line.receive(paths)
    expected = JOB_FAULTS[stage](line, mp, paths)
    line.settle(study_uid)
    job = line.job_of(study_uid)
    assert (job["state"], job["failed_stage"]) == (JobState.FAILED, stage), job["reason"]
    assert expected in job["reason"]
    _assert_no_patient_data(job["reason"])
    last = line.store.jobs.events(job["id"])[-1]
    assert (last["to_state"], last["stage"], last["detail"]) == (JobState.FAILED, stage, job["reason"])


def _receive_fails(line: Line, mp: pytest.MonkeyPatch, study_uid: str, paths: list[Path]) -> None:
    """The disk fills while spooling: the C-STORE is answered 0xA700 (PS3.4 B.2.3) and nothing is recorded."""
    mp.setattr(line.spool, "store", _raise(OSError(errno.ENOSPC, "No space left on device")))
    out = line.receive(paths)
    assert "Received Store Response (Refused: OutOfResources)" in out, out[-2000:]  # storescu stops there
    line.settle(study_uid)
    assert line.store.studies.get(study_uid) is None and not line.store.jobs.find(study_uid=study_uid)
    assert not list(line.spool.root.rglob("*.dcm"))


def _route_fails(line: Line, mp: pytest.MonkeyPatch, study_uid: str, paths: list[Path]) -> None:
    """Routing raises: the study becomes UNROUTED with the error as its reason, and no job is made."""
    mp.setattr("dicom_gateway.assemble.completeness.route_study",
               _raise(ValueError("rule chest: series selection broke")))
    line.receive(paths)
    line.settle(study_uid)
    study = line.store.studies.get(study_uid)
    assert study["state"] == StudyState.UNROUTED
    assert study["reason"] == "route failed: ValueError: rule chest: series selection broke"
    _assert_no_patient_data(study["reason"])
    assert not line.store.jobs.find(study_uid=study_uid)
    assert study["routed_at"] is not None
