"""Prometheus metrics: the job store read at scrape time, plus a few counters observed in this process.

`StoreCollector` answers every scrape from the job store, so its numbers hold across the receiver processes
and survive restarts: studies by state, jobs by model and state (queue depth is `state="QUEUED"`), deliveries
by destination and state, associations and stored instances by calling AE title, and per-stage latency
histograms built from the `stage_seconds` of DONE jobs (the stages of `dicom_gateway.states.Stage` plus
`receive` and `quiet_wait`; `infer` is the model's inference time). In-process: C-STORE responses by DIMSE
status (PS3.7 C.4.2.1.4, refusals included) and model load time.

No label carries patient data or a UID (unbounded cardinality): labels are states, stages, model and
destination names from the configuration, DIMSE statuses, and calling AE titles (PS3.8 7.1.1.6; not PHI),
of which at most `MAX_AE_LABELS` are named and the rest are counted as `other`.
"""

from __future__ import annotations

import json
import math
from collections import Counter as Tally
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_gateway.states import DeliveryState, JobState, StudyState
from dicom_gateway.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format, version 0.0.4."""

MAX_AE_LABELS = 20
"""Calling AE titles named in labels (the most frequent); the others are summed as `other`."""
OTHER = "other"

STAGE_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                                    600.0)
"""Upper bounds (seconds) of the per-stage latency histogram buckets; +Inf is added."""

CSTORE_RESPONSES = Counter("dxgate_cstore_responses", "C-STORE responses sent by this process, by DIMSE status",
                           ["status"], registry=None)
MODEL_LOAD_SECONDS = Gauge("dxgate_model_load_seconds", "Seconds this process took to load a model's backend",
                           ["model"], registry=None)


def observe_cstore(status: int) -> None:
    """Count one C-STORE response (status as a 4-digit hex string, e.g. 0x0000, 0xA700)."""
    CSTORE_RESPONSES.labels(status=f"0x{status:04X}").inc()


def cap_labels(counts: Iterable[tuple[str, float]], limit: int = MAX_AE_LABELS) -> dict[str, float]:
    """Sum counts per label, keeping the `limit` largest and adding the rest up under `other`."""
    total: Tally[str] = Tally()
    for label, n in counts:
        total[label or OTHER] += n
    kept = dict(total.most_common(limit))
    rest = sum(n for label, n in total.items() if label not in kept)
    if rest:
        kept[OTHER] = kept.get(OTHER, 0) + rest
    return kept


def stage_histograms(rows: Iterable[str], buckets: tuple[float, ...] = STAGE_BUCKETS
                     ) -> dict[str, tuple[list[int], float, int]]:
    """Per stage: (cumulative bucket counts incl. +Inf, sum, count) from stored `stage_seconds` JSON objects."""
    out: dict[str, tuple[list[int], float, int]] = {}
    for text in rows:
        try:
            stages = json.loads(text or "{}")
        except ValueError:
            continue
        for stage, seconds in stages.items():
            if not isinstance(seconds, int | float) or math.isnan(seconds):
                continue
            counts, total, n = out.get(stage, ([0] * (len(buckets) + 1), 0.0, 0))
            for i, bound in enumerate(buckets):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1
            out[stage] = (counts, total + float(seconds), n + 1)
    return out


class StoreCollector(Collector):
    """Metrics read from the job store at each scrape (all processes sharing the store included)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        q = self.store.db.query
        studies = GaugeMetricFamily("dxgate_studies", "Studies in the job store by state", labels=["state"])
        found = {r["state"]: r["n"] for r in q("SELECT state, COUNT(*) AS n FROM studies GROUP BY state")}
        for state in StudyState:
            studies.add_metric([state.value], found.get(state.value, 0))
        yield studies

        jobs = GaugeMetricFamily("dxgate_jobs", "Jobs by model and state (queue depth: state QUEUED)",
                                 labels=["model", "state"])
        rows = q("SELECT model, state, COUNT(*) AS n FROM jobs GROUP BY model, state")
        by_model: dict[str, dict[str, int]] = {}
        for r in rows:
            by_model.setdefault(r["model"], {})[r["state"]] = r["n"]
        for model, states in sorted(by_model.items()):
            for state in JobState:
                jobs.add_metric([model, state.value], states.get(state.value, 0))
        yield jobs

        queued = GaugeMetricFamily("dxgate_queue_depth", "Jobs waiting for a worker (QUEUED)")
        queued.add_metric([], sum(s.get(JobState.QUEUED.value, 0) for s in by_model.values()))
        yield queued

        deliveries = GaugeMetricFamily("dxgate_deliveries", "Deliveries by destination and state (DEAD: dead letters)",
                                       labels=["destination", "state"])
        by_dest: dict[str, dict[str, int]] = {}
        for r in q("SELECT destination, state, COUNT(*) AS n FROM deliveries GROUP BY destination, state"):
            by_dest.setdefault(r["destination"], {})[r["state"]] = r["n"]
        for dest, states in sorted(by_dest.items()):
            for state in DeliveryState:
                deliveries.add_metric([dest, state.value], states.get(state.value, 0))
        yield deliveries

        yield from self._by_calling_ae()

        stages = HistogramMetricFamily("dxgate_stage_seconds", "Per-stage wall time of DONE jobs (seconds)",
                                       labels=["stage"])
        done = (r["stage_seconds"] for r in q("SELECT stage_seconds FROM jobs WHERE state=?", (JobState.DONE.value,)))
        for stage, (counts, total, _n) in sorted(stage_histograms(done).items()):
            bounds = [*(repr(b) for b in STAGE_BUCKETS), "+Inf"]
            stages.add_metric([stage], list(zip(bounds, counts, strict=True)), total)
        yield stages

    def _by_calling_ae(self) -> Iterator[Metric]:
        q = self.store.db.query
        assocs = GaugeMetricFamily("dxgate_associations", "Associations accepted, by calling AE title",
                                   labels=["calling_ae"])
        rows = q("SELECT calling_ae, COUNT(*) AS n FROM associations GROUP BY calling_ae")
        for ae, n in sorted(cap_labels((r["calling_ae"], r["n"]) for r in rows).items()):
            assocs.add_metric([ae], n)
        yield assocs
        stored = GaugeMetricFamily("dxgate_instances_stored", "Instances stored, by calling AE title",
                                   labels=["calling_ae"])
        rows = q("SELECT calling_ae, COUNT(*) AS n FROM instances GROUP BY calling_ae")
        for ae, n in sorted(cap_labels((r["calling_ae"], r["n"]) for r in rows).items()):
            stored.add_metric([ae], n)
        yield stored


class _ProcessCollector(Collector):
    """The counters this process observes itself (C-STORE statuses, model load times)."""

    def collect(self) -> Iterator[Metric]:
        yield from CSTORE_RESPONSES.collect()
        yield from MODEL_LOAD_SECONDS.collect()


def registry_for(store: Store) -> CollectorRegistry:
    """A registry of its own (not the global one) with the store's and this process's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    registry.register(_ProcessCollector())
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the Prometheus text format."""
    return generate_latest(registry)
