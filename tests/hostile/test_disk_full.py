"""A disk that really fills (a small tmpfs under the data folder): ENOSPC is 0xA700, nothing acknowledged
is lost, and the gateway stores again once space is freed. Needs `mount -t tmpfs` (root); skipped without.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from harness.gateway import RunningGateway, start_gateway, write_config
from harness.hostile import CT_IMAGE_STORAGE, encode_dataset
from harness.system import ToolMissing
from tests.hostile.support import OUT_OF_RESOURCES, SUCCESS, assert_alive, assert_kept, ct, open_peer

pytestmark = pytest.mark.integration

TMPFS_MB = 24
BALLAST_MB = 6


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mount = tmp_path_factory.mktemp("small-disk")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise ToolMissing(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture(scope="module")
def full_gw(small_disk: Path, tmp_path_factory: pytest.TempPathFactory, gateway_models: Path,
            ) -> Iterator[RunningGateway]:
    config = write_config(tmp_path_factory.mktemp("disk-full-gw"), gateway_models, rules=[],
                          data_dir=str(small_disk / "var"), min_free_disk_mb=0,  # no watermark: a real ENOSPC
                          allowed_calling_aes=["HOSTILE", "ECHOSCU"])
    gw = start_gateway(config, until="healthy")
    yield gw
    gw.stop()


def test_disk_really_full_answers_a700_and_recovers(full_gw: RunningGateway, small_disk: Path) -> None:
    gw = full_gw
    ballast = small_disk / "ballast"
    ballast.write_bytes(bytes(BALLAST_MB * 1024 * 1024))  # freed later, as an admin would free space
    study, series = generate_uid(), generate_uid()
    acked: list[str] = []
    statuses: list[int | None] = []
    peer, cx = open_peer(gw)
    with peer:
        for i in range(1, 80):  # 512 KiB each: the 24 MB disk fills well before the end
            ds = ct(study_uid=study, series_uid=series, instance_number=i, rows=512, columns=512)
            status = peer.c_store(cx, CT_IMAGE_STORAGE, str(ds.SOPInstanceUID), encode_dataset(ds))
            statuses.append(status)
            if status == SUCCESS:
                acked.append(str(ds.SOPInstanceUID))
            else:
                break
        peer.release()
    assert statuses[-1] == OUT_OF_RESOURCES, statuses[-5:]
    assert re.search(r"No space left|ENOSPC|Errno 28", gw.log()), "refused, but not for a full disk"
    assert acked, "the disk filled before a single instance"
    assert_kept(gw, acked, study)
    assert_alive(gw)

    ballast.unlink()
    later = ct(study_uid=study, series_uid=series, instance_number=200, rows=512, columns=512)
    peer, cx = open_peer(gw)
    with peer:
        assert peer.c_store(cx, CT_IMAGE_STORAGE, str(later.SOPInstanceUID), encode_dataset(later)) == SUCCESS
        peer.release()
    assert_kept(gw, [*acked, str(later.SOPInstanceUID)], study)
    assert_alive(gw)
