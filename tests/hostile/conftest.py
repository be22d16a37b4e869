"""One `dxgate serve` for the whole hostile suite, with a valid chest CT sent through it while the cases run.

The gateway sends results to three destinations: dcmtk storescp (DEST), an SCP that aborts its first
association at the 3rd object (FLAKY) and one that never answers (MUTE). Its limits are small so that
each case is quick: 5 s network timeout, 32 MB per data set, 16 associations per calling AE, 100 slices
per series, 6 s of abort grace. tests/hostile/test_survivors.py (last, by name) checks the valid study.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from harness.ct import write_chest_study
from harness.dcmtk import StoreSCP, run_storescu, start_storescp
from harness.gateway import RunningGateway, start_gateway, write_config
from harness.hostile import AbortingSCP, SilentSCP
from harness.models import operating_point_copy
from tests.hostile.support import with_canaries
from tests.integration.conftest import gateway_models  # noqa: F401  (the same models as the end-to-end tests)

ALLOWED_AES = ["PACS", "ECHOSCU", "STORESCU", "HOSTILE", "FLOOD", {"ae_title": "BOUND", "hosts": ["10.9.9.9"]}]
LIMITS = {"max_dataset_mb": 32, "max_associations_per_ae": 16, "max_associations_per_host": 64,
          "max_association_seconds": 20, "max_slices": 100}


@dataclass
class ValidStudy:
    """The chest CT sent concurrently with the cases, and what storescu said."""

    study_uid: str
    files: list[Path]
    sop_uids: list[str]
    result: list = field(default_factory=list)  # [CompletedProcess] once storescu has finished
    thread: threading.Thread | None = None


@dataclass
class Suite:
    gw: RunningGateway
    dest: StoreSCP
    flaky: AbortingSCP
    mute: SilentSCP
    valid: ValidStudy


@pytest.fixture(scope="package")
def valid_study(tmp_path_factory: pytest.TempPathFactory) -> ValidStudy:
    """A 60-slice 256x256 synthetic chest CT whose patient carries the PHI canaries."""
    out = tmp_path_factory.mktemp("hostile-chest")
    files = write_chest_study(out, slices=60, rows=256, seed=23)
    uids = []
    for f in files:
        ds = with_canaries(pydicom.dcmread(f))
        ds.save_as(f, enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return ValidStudy(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files, uids)


@pytest.fixture(scope="package")
def suite(tmp_path_factory: pytest.TempPathFactory, gateway_models: Path,  # noqa: F811
          valid_study: ValidStudy) -> Iterator[Suite]:
    """The shared gateway, its destinations, and the valid study already on its way (storescu, PACS)."""
    tmp = tmp_path_factory.mktemp("hostile")
    models = operating_point_copy(gateway_models, valid_study.files, tmp / "models")  # SR + SEG + GSPS
    dest = start_storescp(tmp / "dest", "DEST")
    flaky, mute = AbortingSCP("FLAKY"), SilentSCP("MUTE")
    destinations = [{"name": "dest", "ae_title": "DEST", "host": "127.0.0.1", "port": dest.port},
                    {"name": "flaky", "ae_title": "FLAKY", "host": "127.0.0.1", "port": flaky.port},
                    {"name": "mute", "ae_title": "MUTE", "host": "127.0.0.1", "port": mute.port}]
    config = write_config(tmp / "gw", models, destinations=destinations, allowed_calling_aes=ALLOWED_AES,
                          network_timeout_s=5, abort_grace_seconds=6, max_associations=64, limits=LIMITS,
                          sender={"max_attempts": 3, "backoff_initial_s": 0.5, "backoff_max_s": 1.0,
                                  "timeout_s": 4})
    try:
        gw = start_gateway(config)
    except BaseException:
        for peer in (dest, flaky, mute):
            peer.stop()
        raise

    def send() -> None:
        valid_study.result.append(run_storescu(valid_study.files, gw.dicom_port, gw.ae_title, "PACS",
                                               timeout_s=120))

    valid_study.thread = threading.Thread(target=send, name="valid-chest-ct", daemon=True)
    valid_study.thread.start()
    try:
        yield Suite(gw, dest, flaky, mute, valid_study)
    finally:
        gw.stop()
        for peer in (dest, flaky, mute):
            peer.stop()


@pytest.fixture
def gw(suite: Suite) -> RunningGateway:
    return suite.gw
