"""C-STORE ingest throughput of dxgate's SCP against dcmtk's storescp, measured in the same run.

One synthetic CT series is sent by dcmtk `storescu` over 1 association and over 4 parallel
associations to `dxgate serve` (fsync on and off) and to dcmtk `storescp` (`--fork` for 4), with
TCP_NODELAY=1 in the environment of dcmtk on both sides and the same maximum PDU size.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from harness.ct import write_chest_study
from harness.dcmtk import run_storescu, start_storescp
from harness.gateway import start_gateway, write_config
from harness.system import StartError

NAME = "ingest"
SCU_AE = "BENCHSCU"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slices", type=int, default=None, help="slices in the series (default 300; tiny 6)")
    p.add_argument("--rows", type=int, default=None, help="rows = columns (default 512; tiny 128)")
    p.add_argument("--associations", type=int, nargs="+", default=[1, 4], help="parallel associations to test")
    p.add_argument("--pdu", type=int, default=116794, help="max PDU receive size for storescu and storescp")
    p.add_argument("--repeats", type=int, default=None, help="sends per configuration (default 2; tiny 1)")
    p.add_argument("--fsync", choices=["both", "on", "off"], default="both", help="dxgate fsync settings to run")
    p.add_argument("--receivers", type=int, nargs="+", default=[1], help="dxgate `receivers` settings to run")


def send(files: list[Path], port: int, aec: str, associations: int, pdu: int) -> tuple[float, list[str]]:
    """storescu over `associations` parallel associations; returns (seconds, errors)."""
    chunks = [c for c in (files[i::associations] for i in range(associations)) if c]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        done = list(pool.map(lambda chunk: run_storescu(chunk, port, aec, SCU_AE, ["-pdu", str(pdu)], timeout_s=1800),
                             chunks))
    seconds = time.perf_counter() - t0
    return seconds, [res.stderr[-500:] for res in done if res.returncode != 0]


def _measure(target: str, files: list[Path], nbytes: int, port: int, aec: str, assoc: int, args: argparse.Namespace,
             repeats: int, extra: dict[str, Any]) -> dict[str, Any]:
    times, errors = [], []
    for _ in common.progress(range(repeats), f"{target} x{assoc}"):
        seconds, errs = send(files, port, aec, assoc, args.pdu)
        times.append(seconds)
        errors += errs
    best = min(times)
    row = {"target": target, "associations": assoc, "images": len(files), "bytes": nbytes, "seconds": times,
           "images_per_s": len(files) / best, "mb_per_s": nbytes / best / 1e6, "errors": errors, **extra}
    common.log(f"{target} x{assoc}: {row['images_per_s']:.1f} images/s, {row['mb_per_s']:.1f} MB/s")
    return row


def run(args: argparse.Namespace, out: Path, info: dict[str, Any]) -> dict[str, Any]:
    slices = args.slices or (6 if args.tiny else 300)
    rows = args.rows or (128 if args.tiny else 512)
    repeats = args.repeats or (1 if args.tiny else 2)
    fsyncs = {"both": [True, False], "on": [True], "off": [False]}[args.fsync]
    result = common.payload(NAME, info, {
        "slices": slices, "rows": rows, "associations": args.associations, "repeats": repeats,
        "max_pdu_storescu": args.pdu, "max_pdu_storescp": args.pdu, "max_pdu_dxgate": 0,
        "TCP_NODELAY_dcmtk": 1, "tcp_nodelay_dxgate": True, "fsync_dxgate": fsyncs, "fsync_storescp": "n/a (none)",
        "transfer_syntax": "as written (Explicit VR Little Endian)", "metric": "best of repeats"})
    with tempfile.TemporaryDirectory(prefix="dxgate-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        common.log(f"writing {slices} slices of {rows}x{rows}")
        files = write_chest_study(tmp / "study", slices, rows, seed=1)
        nbytes = sum(f.stat().st_size for f in files)
        for assoc in args.associations:
            scp = start_storescp(tmp / f"storescp-{assoc}", "STORESCP",
                                 extra=["-pdu", str(args.pdu), *(["--fork"] if assoc > 1 else [])])
            try:
                result["results"].append(_measure("storescp" + (" --fork" if assoc > 1 else ""), files, nbytes,
                                                  scp.port, "STORESCP", assoc, args, repeats, {"fsync": None}))
            finally:
                scp.stop()
        for fsync, receivers in [(f, r) for f in fsyncs for r in args.receivers]:
            target = f"dxgate fsync={'on' if fsync else 'off'}" + (f" receivers={receivers}" if receivers > 1 else "")
            try:
                (tmp / "no-models").mkdir(exist_ok=True)
                gw = start_gateway(write_config(tmp / f"dxgate-fsync-{fsync}-r{receivers}", tmp / "no-models",
                                                fsync=fsync, quiet_seconds=30.0, receivers=receivers, rules=[],
                                                max_associations=max(args.associations) + 2),
                                   timeout=120, until="healthy")
            except (StartError, TimeoutError, FileNotFoundError) as exc:
                result["results"].append({"target": target, "error": str(exc)[-1000:]})
                common.log(f"dxgate skipped: {str(exc).splitlines()[0]}")
                continue
            try:
                for assoc in args.associations:
                    result["results"].append(_measure(target, files, nbytes, gw.dicom_port, gw.ae_title,
                                                      assoc, args, repeats, {"fsync": fsync, "receivers": receivers}))
            finally:
                gw.stop()
    _summarise(result, out)
    return result


def _summarise(result: dict[str, Any], out: Path) -> None:
    ok = [r for r in result["results"] if "images_per_s" in r]
    base = {r["associations"]: r["images_per_s"] for r in ok if r["target"].startswith("storescp")}
    for r in ok:
        r["ratio_vs_storescp"] = r["images_per_s"] / base[r["associations"]] if r["associations"] in base else None
    result["summary"] = {f"{r['target']} x{r['associations']}": {
        "images_per_s": r["images_per_s"], "mb_per_s": r["mb_per_s"], "ratio_vs_storescp": r["ratio_vs_storescp"]}
        for r in ok}
    result["summary"]["dxgate_available"] = any(r["target"].startswith("dxgate") for r in ok)
    common.write_json(out / f"{NAME}.json", result)
    rows = [{"target": r["target"], "associations": r.get("associations"), "images/s": r.get("images_per_s"),
             "MB/s": r.get("mb_per_s"), "ratio vs storescp": r.get("ratio_vs_storescp"),
             "errors": len(r.get("errors", [])) if "error" not in r else r["error"].splitlines()[0]}
            for r in result["results"]]
    common.write_markdown(out / f"{NAME}.md", "C-STORE ingest throughput", result, [
        ("Throughput (best of repeats)", common.md_table(rows, list(rows[0]) if rows else ["target"])),
        ("Notes", "storescp writes without fsync; compare it with dxgate fsync=off for the protocol cost and "
                  "with fsync=on for the durability cost. Both sides run dcmtk with TCP_NODELAY=1.")])
    common.bar_plot(out / f"{NAME}_throughput.png", [f"{r['target']} x{r['associations']}" for r in ok],
                    [r["images_per_s"] for r in ok], "images / s", "C-STORE ingest (storescu -> SCP)")
