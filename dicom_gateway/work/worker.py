"""The worker: claims a job (lease), runs the model on the chosen series, encodes and validates results.

series -> volume -> preprocess -> backend.infer() -> postprocess -> findings (inference.pipeline), then
SR + SEG + GSPS (and SC where a destination asks for it) built with highdicom, validated, written to
the outbox atomically, and the job moved to ENCODED with one delivery per destination in one transaction.

While a job runs its lease is renewed (work.heartbeat); every write to the job checks, in its transaction,
that this worker still holds the lease. A worker that lost it (another reclaimed the job) drops its
results: LeaseLostError, its outbox files removed, the other worker's job left alone.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from dicom_gateway.errors import LeaseLostError
from dicom_gateway.settings import Settings
from dicom_gateway.states import Stage
from dicom_gateway.store import Store
from dicom_gateway.work.heartbeat import Heartbeat
from dicom_gateway.work.outbox import job_folder, remove_files, sync_folder, write_atomic
from inference.errors import InferenceError, ModelNotFoundError, VolumeError
from inference.model_repo import RegisteredModel
from inference.pipeline import ModelRunner
from inference.redaction import redact

log = logging.getLogger("dxgate.worker")


@dataclass
class LoadedModel:
    model: RegisteredModel
    runner: ModelRunner


def _output_entry(kind: str, path: Path, ds: pydicom.Dataset) -> dict[str, Any]:
    return {"kind": kind, "path": str(path), "sop_instance_uid": str(ds.SOPInstanceUID),
            "sop_class_uid": str(ds.SOPClassUID), "series_instance_uid": str(ds.SeriesInstanceUID)}


def _read_reports(outputs: Sequence[dict[str, Any]]) -> list[pydicom.Dataset]:
    """The earlier SRs still in the outbox (one removed or unreadable is skipped: its findings get new UIDs)."""
    reports = []
    for o in outputs:
        try:
            reports.append(pydicom.dcmread(o["path"]))
        except (OSError, KeyError, pydicom.errors.InvalidDicomError) as exc:
            log.warning("earlier report not read: %s", type(exc).__name__)
    return reports


class Worker:
    """Runs jobs one at a time. Several workers may share a store: the lease keeps them apart."""

    def __init__(self, settings: Settings, store: Store, models: dict[str, LoadedModel],
                 worker_id: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.worker_id = worker_id or f"{os.getpid()}-{uuid.uuid4().hex[:6]}"

    # -- the loop -----------------------------------------------------------------------------
    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if not self.run_once():
                    stop.wait(self.settings.worker.poll_interval_s)
            except Exception:  # the loop must survive anything; the job itself is failed in run_job
                log.exception("worker loop error")
                stop.wait(1.0)

    def run_once(self) -> bool:
        lease_s = self.settings.worker.lease_s
        job = self.store.jobs.claim(self.worker_id, lease_s, self.settings.worker.max_crashes)
        if job is None:
            return False
        with Heartbeat(self.store, int(job["id"]), self.worker_id, lease_s):
            self.run_job(job)
        return True

    # -- one job ------------------------------------------------------------------------------
    def run_job(self, job: Any) -> None:
        """Run one claimed job to ENCODED or FAILED (with its stage); a lost lease drops the results."""
        job_id = int(job["id"])
        extra = {"job_id": job_id, "study_uid": job["study_uid"], "model": job["model"]}
        stage = Stage.LOAD_MODEL
        written: list[Path] = []
        try:
            loaded = self.models.get(job["model"])
            if loaded is None:
                raise ModelNotFoundError(f"model {job['model']!r} is not loaded")
            if loaded.model.version != job["model_version"]:
                raise ModelNotFoundError(f"model {job['model']} version {loaded.model.version} is loaded, job needs "
                                     f"{job['model_version']}")
            self._record_wait_stages(job)
            stage = Stage.LOAD
            paths = self._input_paths(job)
            result = loaded.runner.run(paths)
            self.store.jobs.record_stages(job_id, result.stage_seconds, self.worker_id)
            stage = Stage.ENCODE
            outputs = self._encode_and_validate(job, loaded.model, result, paths, written)
            self.store.jobs.finish_encoding(job_id, outputs, loaded.model.card.weights_sha256,
                                            len(result.findings), json.loads(job["destinations"]), self.worker_id)
            log.info("job encoded", extra={**extra, "state": "ENCODED", "count": len(result.findings)})
        except LeaseLostError as exc:
            self._drop(exc, written, extra)
        except InferenceError as exc:
            stage = Stage(exc.stage)
            log.warning("job failed: %s", exc, extra={**extra, "stage": stage})
            self._fail(job_id, stage, f"{type(exc).__name__}: {exc}", written, extra)
        except Exception as exc:  # an unexpected error still ends the job FAILED with its stage
            reason = redact(f"{type(exc).__name__}: {exc}")  # third-party messages may quote attribute values
            log.error("job failed unexpectedly: %s\n%s", reason, "".join(traceback.format_tb(exc.__traceback__)),
                      extra={**extra, "stage": stage})
            self._fail(job_id, stage, reason, written, extra)

    def _fail(self, job_id: int, stage: Stage, reason: str, written: list[Path], extra: dict[str, Any]) -> None:
        try:
            self.store.jobs.fail(job_id, stage, reason, self.worker_id)
        except LeaseLostError as exc:
            self._drop(exc, written, extra)
            return
        remove_files(written)  # a FAILED job's outputs are never sent; replay encodes afresh

    def _drop(self, exc: LeaseLostError, written: list[Path], extra: dict[str, Any]) -> None:
        """Another worker runs this job now: leave its job alone, remove only this worker's files."""
        removed = remove_files(written)
        log.warning("results dropped: %s", exc, extra={**extra, "count": removed})

    def _record_wait_stages(self, job: Any) -> None:
        study = self.store.studies.get(job["study_uid"])
        if study is None:
            return
        stages = {"receive": study["last_received_at"] - study["first_received_at"]}
        if study["ready_at"]:
            stages["quiet_wait"] = study["ready_at"] - study["last_received_at"]
        self.store.jobs.record_stages(int(job["id"]), stages, self.worker_id)

    def _input_paths(self, job: Any) -> list[Path]:
        uids = set(json.loads(job["inputs"]))
        rows = [r for r in self.store.instances.of_study(job["study_uid"]) if r["sop_instance_uid"] in uids]
        missing = uids - {r["sop_instance_uid"] for r in rows}
        if missing:
            raise VolumeError(f"{len(missing)} input instance(s) missing from the store")
        paths = [Path(r["path"]) for r in rows]
        lost = [p for p in paths if not p.is_file()]
        if lost:
            raise VolumeError(f"{len(lost)} input file(s) missing from the spool, e.g. {lost[0].name}")
        return paths

    def _encode_and_validate(self, job: Any, model: RegisteredModel, result: Any, paths: Sequence[Path],
                             written: list[Path]) -> list[dict[str, Any]]:
        """Encode and validate the results, write them to the outbox (each path appended to `written`)."""
        from inference.encode import encode_gsps, encode_secondary_capture, encode_seg, encode_sr
        from inference.encode.naming import carry_from_reports
        from inference.errors import ValidationFailedError
        from inference.validation import validate_output

        t0 = time.perf_counter()
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        dests = [self.settings.destination(n) for n in json.loads(job["destinations"])
                 if n in {d.name for d in self.settings.destinations}]
        produced: list[tuple[str, pydicom.Dataset]] = []
        earlier = [o for o in self.store.jobs.earlier_outputs(int(job["id"])) if o["kind"] == "sr"]
        # a finding found again keeps the Tracking UID the superseded report gave it (SR, SEG and GSPS alike)
        result = carry_from_reports(result, _read_reports(earlier), sources)
        seg = encode_seg(result, model.card, sources)
        if seg is not None:
            produced.append(("seg", seg))
        supersedes = [(str(sources[0].StudyInstanceUID), o["series_instance_uid"], o["sop_instance_uid"])
                      for o in earlier]
        produced.insert(0, ("sr", encode_sr(result, model.card, sources, seg=seg, supersedes=supersedes)))
        if any(d.overlay == "gsps" for d in dests) or not dests:
            gsps = encode_gsps(result, model.card, sources)
            if gsps is not None:
                produced.append(("gsps", gsps))
        if any(d.overlay == "sc" for d in dests):
            wanted = {f.referenced_sop_instance_uid for f in result.findings}
            # pixels only for the slices that carry a finding: no whole-study copy in memory
            sc_sources = [pydicom.dcmread(p) if s.SOPInstanceUID in wanted else s
                          for p, s in zip(paths, sources, strict=True)]
            produced.extend(("sc", ds) for ds in encode_secondary_capture(result, model.card, sc_sources))
        t1 = time.perf_counter()
        for kind, ds in produced:
            try:
                validate_output(ds)
            except ValidationFailedError as exc:
                raise ValidationFailedError(f"{kind.upper()} failed validation: {exc}") from exc
        t2 = time.perf_counter()
        fsync = self.settings.fsync
        out_dir = job_folder(self.settings.outbox_dir, int(job["id"]), fsync)
        outputs = []
        for n, (kind, ds) in enumerate(produced):
            path = out_dir / f"{n:02d}_{kind}_{ds.SOPInstanceUID}.dcm"
            written.append(path)
            write_atomic(path, ds, fsync)
            outputs.append(_output_entry(kind, path, ds))
        if fsync:
            sync_folder(out_dir)
        self.store.jobs.record_stages(int(job["id"]), {"encode": t1 - t0 + (time.perf_counter() - t2),
                                                       "validate": t2 - t1}, self.worker_id)
        return outputs
