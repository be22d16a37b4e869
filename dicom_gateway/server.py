"""`dxgate serve`: one process running the SCP, assembly/routing, worker(s), sender and the HTTP API.

Start-up recovers from a crash (`Gateway._recover`): partial and unrecorded spool files are removed,
associations left open are closed (they can never be released), RUNNING jobs are requeued (or FAILED
once they have crashed the worker `worker.max_crashes` times), stray outbox files are removed. Every
loop reads and writes only the job store and the spool, so a SIGKILL at any moment loses nothing that
was acknowledged.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_gateway.assemble.completeness import mark_ready_studies, route_ready_studies
from dicom_gateway.errors import ConfigError
from dicom_gateway.logs import configure_logging
from dicom_gateway.metrics import MODEL_LOAD_SECONDS
from dicom_gateway.settings import Settings
from dicom_gateway.settings_security import ApiToken
from dicom_gateway.store import Store
from dicom_gateway.work.worker import LoadedModel, Worker
from inference.backends.base import Backend
from inference.backends.factory import make_backend
from inference.composition import build_runner
from inference.device_preprocess import device_preprocessor_for
from inference.errors import InferenceError
from inference.model_repo import discover_models
from inference.pipeline import Preprocessor

if TYPE_CHECKING:
    from dicom_gateway.receive.receivers import ReceiverPool
    from dicom_gateway.receive.scp import StorageSCP

log = logging.getLogger("dxgate.server")


def load_models(settings: Settings) -> dict[str, LoadedModel]:
    """Every model under models_dir with a warm backend, each runner built as its card composes it (a model whose
    card declares later stages runs those stages' models too); a broken model folder refuses start. Every runner
    and device preprocessor is bounded by the `limits:` settings (slices, voxels, model grid)."""
    from inference.limits import VolumeLimits

    limits = VolumeLimits(max_slices=settings.limits.max_slices, max_voxels=settings.limits.max_voxels,
                          max_model_grid_voxels=settings.limits.max_model_grid_voxels)
    try:
        found = discover_models(settings.models_dir)
    except InferenceError as exc:
        raise ConfigError(f"models_dir {settings.models_dir}: {exc}") from exc
    backends: dict[str, Backend] = {}
    preprocessors: dict[str, Preprocessor | None] = {}
    for name, model in found.items():
        opts = settings.backends.get(name)
        kind = opts.kind if opts else "onnxruntime"
        options = opts.model_dump(exclude={"kind"}, exclude_none=True) if opts else {}
        t0 = time.monotonic()
        try:
            backends[name] = make_backend(model, kind, **options)
        except InferenceError as exc:
            raise ConfigError(f"model {name}: backend {kind} cannot start: {exc}") from exc
        use_device = opts is None or opts.device_preprocess
        preprocessors[name] = device_preprocessor_for(backends[name], limits) if use_device else None
        MODEL_LOAD_SECONDS.labels(model=name).set(time.monotonic() - t0)
        log.info("model loaded", extra={"model": name, "reason": f"version {model.version} backend {kind}"})
    loaded: dict[str, LoadedModel] = {}
    for name, model in found.items():
        try:
            runner = build_runner(model, found, backends, preprocessor=preprocessors[name], limits=limits)
        except InferenceError as exc:
            raise ConfigError(f"model {name}: {exc}") from exc
        loaded[name] = LoadedModel(model=model, runner=runner)
    wanted = {m for rule in settings.rules for m in rule.models}
    for name in sorted(wanted - set(loaded)):
        log.warning("a rule names model %s, which is not installed in %s", name, settings.models_dir)
    return loaded


@dataclass
class Gateway:
    """All components of one dxgate process; `start()` returns once they run, `stop()` joins them."""

    settings: Settings
    store: Store = field(init=False)
    models: dict[str, LoadedModel] = field(init=False, default_factory=dict)
    scp: StorageSCP | None = field(init=False, default=None)           # receivers == 1
    receivers: ReceiverPool | None = field(init=False, default=None)   # receivers > 1
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        from dicom_gateway.route.rules import validate_rules

        validate_rules(self.settings.rules)
        for d in (self.settings.data_dir, self.settings.spool_dir, self.settings.outbox_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.settings.db_path, durable=self.settings.fsync)

    def start(self) -> None:
        from dicom_gateway.receive.scp import StorageSCP
        from dicom_gateway.receive.spool import Spool
        from dicom_gateway.send.sender import Sender

        s = self.settings
        self.spool = Spool(s.spool_dir, fsync=s.fsync, min_free_bytes=s.min_free_disk_bytes)
        self._recover()
        self.models = load_models(s)
        if s.receivers > 1:  # after close_stale_associations(): receivers' associations are live ones
            from dicom_gateway.receive.receivers import ReceiverPool

            self.receivers = ReceiverPool(s, self.store)
            self.receivers.start()
        else:
            self.scp = StorageSCP(s, self.store, self.spool)
            self.scp.start()
        self.sender = Sender(s, self.store)
        self._spawn("assembly", self._assembly_loop)
        for n in range(s.worker.count):
            worker = Worker(s, self.store, self.models)
            self._spawn(f"worker-{n}", worker.run_forever, self._stop)
        self._spawn("sender", self.sender.run_forever, self._stop)
        log.info("dxgate listening", extra={"reason": f"AE {s.ae_title} port {s.dicom_port} http {s.http_port}"})

    def _recover(self) -> None:
        """Before any component runs: undo what an unclean stop left half-done.

        Temp files and spool files with no instance row (a crash between the fsync and the commit: the peer
        got no success status and sends again) are removed; associations left open are closed; RUNNING jobs
        count a crash and are requeued, or end FAILED at worker.max_crashes; outbox files no job records
        are removed. Deliveries resume from `sent_uids` (only what was not acknowledged is sent again)."""
        from dicom_gateway.work.outbox import remove_unreferenced

        s = self.settings
        self.spool.cleanup_temp()
        recorded = self.store.instances.recorded_files()
        paths = {str(Path(r["path"]).absolute()) for r in recorded}
        uids = {r["sop_instance_uid"] for r in recorded}
        unrecorded = [p for p in self.spool.instance_files() if str(p.absolute()) not in paths and p.stem not in uids]
        for p in unrecorded:
            self.spool.remove(p)
        closed = self.store.associations.close_stale()
        requeued, failed = self.store.jobs.recover_orphans(s.worker.max_crashes)
        for job_id in failed:
            log.error("job failed: the worker died while running it %d times", s.worker.max_crashes,
                      extra={"job_id": job_id, "state": "FAILED"})
        outputs = {p if Path(p).is_absolute() else str(s.outbox_dir / p) for p in self.store.jobs.output_paths()}
        stray = remove_unreferenced(s.outbox_dir, {Path(p) for p in outputs})
        if unrecorded or closed or requeued or failed or stray:
            log.warning("recovered after an unclean stop: %d unrecorded spool file(s) removed, %d association(s)"
                        " closed, %d job(s) requeued, %d failed (crash loop), %d stray outbox file(s) removed",
                        len(unrecorded), closed, len(requeued), len(failed), stray,
                        extra={"count": len(unrecorded) + closed + len(requeued) + len(failed) + stray})

    def _spawn(self, name: str, target, *args) -> None:  # noqa: ANN001
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _assembly_loop(self) -> None:
        while not self._stop.is_set():
            try:
                mark_ready_studies(self.settings, self.store)
                route_ready_studies(self.settings, self.store, {n: m.model for n, m in self.models.items()})
            except Exception:
                log.exception("assembly loop error")
            self._stop.wait(0.2)

    def readiness(self) -> dict[str, bool]:
        try:
            self.store.db.query("SELECT 1")
            store_ok = True
        except Exception:
            store_ok = False
        usage = shutil.disk_usage(self.settings.data_dir)
        return {
            "scp": self.receivers.alive() if self.receivers is not None else
                   self.scp is not None and self.scp.is_running,
            "store": store_ok,
            "models": bool(self.models),
            "disk": usage.free >= self.settings.min_free_disk_bytes,
        }

    def stop(self) -> None:
        self._stop.set()
        if self.scp is not None:
            self.scp.stop()
        if self.receivers is not None:
            self.receivers.stop()
        for t in self._threads:
            t.join(timeout=10)
        for m in self.models.values():
            m.runner.backend.close()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def api_tokens(settings: Settings) -> list[ApiToken]:
    """The API's bearer tokens: `api_tokens`, or the local admin token in `<data_dir>/api-token`, generated and
    printed once (to stderr, never to the log) at the first start."""
    from dicom_gateway.api.auth import TOKEN_FILE, api_tokens_for

    tokens, generated = api_tokens_for(settings.api_tokens, settings.data_dir)
    path = settings.data_dir / TOKEN_FILE
    if generated is not None:
        print(f"API token (admin) written to {path}: {generated}  (send it as `Authorization: Bearer <token>`;"
              " shown only at this first start)", file=sys.stderr, flush=True)
    elif not settings.api_tokens:
        log.info("API token (admin) read from the token file", extra={"reason": str(path)})
    return tokens


def serve(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM. The HTTP API runs in the main thread (uvicorn handles the signals), on
    `http_bind_address`, behind bearer tokens (`api_tokens`)."""
    import uvicorn

    from dicom_gateway.api.app import create_app

    configure_logging(settings.log_level, settings.log_format)
    # uvicorn re-raises the signal it caught once its own shutdown is done; with this handler that
    # becomes SystemExit, so the `finally` below stops the SCP, workers and sender cleanly.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    gateway = Gateway(settings)
    gateway.start()
    try:
        app = create_app(settings, gateway.store, gateway.readiness, api_tokens(settings))
        config = uvicorn.Config(app, host=settings.http_bind_address, port=settings.http_port, log_config=None,
                                access_log=False)
        uvicorn.Server(config).run()
    finally:
        gateway.stop()
    return 0
