"""The `dxgate` command line: config, synth, rules test, send, jobs, models (real files, stores and peers)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml

from dicom_gateway.settings import load_settings
from dicom_gateway.store import Store
from dxgate.main import build_parser, main
from harness.dcmtk import start_storescp

REPO = Path(__file__).resolve().parents[1]
RULES = [
    {"name": "chest-ct-nodules", "match": {"modality": ["CT"], "body_part": ["CHEST"]}, "models": ["lung_nodule_ct"]},
    {"name": "spine", "match": {"modality": ["CT"], "body_part": ["SPINE"]}, "models": ["spine_vertebrae_ct"]},
]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`dxgate argv...` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refuses the command line
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def write_cfg(tmp: Path, **values: object) -> Path:
    path = tmp / "dxgate.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp / "var"), **values}))
    return path


def dicom_files(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.rglob("*.dcm"))]


# -- the command line itself ---------------------------------------------------------------------
def _actions(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action | None, str]]:
    """(command path, action, help) for every option, positional and subcommand under parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", None, helps.get(name) or ""
                yield from _actions(sub, f"{path} {name}")
        else:
            yield path, action, action.help or ""


def _bench_parsers() -> dict[str, argparse.ArgumentParser]:
    """`dxgate bench NAME --help` is the benchmark's own parser."""
    from benchmarks.__main__ import build_parser as bench_parser

    sub = next(a for a in bench_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_and_command_has_help() -> None:
    found = list(_actions(build_parser(), "dxgate"))
    found += [a for name, p in _bench_parsers().items() for a in _actions(p, f"dxgate bench {name}")]
    missing = [f"{path}: {action.option_strings or action.dest if action else 'the command'}"
               for path, action, text in found if not text.strip() or text == argparse.SUPPRESS]
    assert not missing, "no help text:\n" + "\n".join(missing)
    commands = {path for path, action, _ in found if action is None}
    assert {"dxgate serve", "dxgate send", "dxgate jobs replay", "dxgate models doc", "dxgate bench"} <= commands


@pytest.mark.parametrize("command", ["", "serve", "config", "synth", "send", "rules", "jobs", "jobs replay",
                                     "jobs rerun", "token", "token new", "models", "models doc", "train", "evaluate"])
def test_help_prints_and_exits_zero(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, *command.split(), "--help")
    assert code == 0 and out.startswith("usage: dxgate"), out
    assert "options:" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from dxgate import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"dxgate {__version__}" and re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)


def test_send_takes_storescus_argument_order(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["send", "-aet", "CT1", "-aec", "PACS", "pacs.local", "104", "a.dcm", "dir"])
    assert (args.aet, args.aec, args.peer, args.port, args.files) == ("CT1", "PACS", "pacs.local", 104,
                                                                      [Path("a.dcm"), Path("dir")])
    args = build_parser().parse_args(["send", "127.0.0.1", "11112", "study"])
    assert (args.aet, args.aec) == ("DXGATE_SCU", "DXGATE")
    code, _, err = run_cli(capsys, "send", "study", "--port", "11112")  # the old order is refused
    assert code == 2 and "usage: dxgate send" in err, err


# -- config ---------------------------------------------------------------------------------------
def test_config_example_is_a_valid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "dxgate", "config", "example"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    data = yaml.safe_load(res.stdout)
    assert data["ae_title"] and data["rules"] and data["destinations"]
    path = tmp_path / "example.yaml"
    path.write_text(res.stdout)
    settings = load_settings(path)
    assert [r.name for r in settings.rules] == [r["name"] for r in data["rules"]]

    code, out, err = run_cli(capsys, "config", "check", "--config", path)
    assert code == 0, err
    assert json.loads(out)["ae_title"] == data["ae_title"]


def test_config_check_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path, ae_titel="DXGATE", sender={"max_attempts": 0})
    code, out, err = run_cli(capsys, "config", "check", "--config", cfg)
    assert code == 2
    assert "ae_titel" in err and "unknown key" in err, err
    assert "sender.max_attempts" in err, err
    assert out == ""


def test_config_check_names_an_unknown_environment_variable(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DXGATE_NO_SUCH_SETTING", "1")
    code, _, err = run_cli(capsys, "config", "check", "--config", write_cfg(tmp_path))
    assert code == 2
    assert "DXGATE_NO_SUCH_SETTING" in err, err


def test_config_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "config", "check", "--config", tmp_path / "nope.yaml")
    assert code == 2
    assert "nope.yaml" in err, err


# -- synth ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["chest-ct", "spine-ct"])
def test_synth_writes_a_study_and_annotations(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / kind
    args = ["synth", kind, "--out", out_dir, "--slices", "8", "--rows", "64", "--seed", "3"]
    if kind == "chest-ct":
        args += ["--nodules", "1"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    datasets = dicom_files(out_dir)
    assert len(datasets) == 8
    assert len({str(ds.SOPInstanceUID) for ds in datasets}) == 8
    assert len({str(ds.StudyInstanceUID) for ds in datasets}) == 1
    assert {ds.Modality for ds in datasets} == {"CT"}
    assert {(ds.Rows, ds.Columns) for ds in datasets} == {(64, 64)}
    annotations = re.search(r"annotations: (.+)$", out, re.MULTILINE)
    assert annotations, out
    path = Path(annotations.group(1).strip())
    truth = "annotations.csv" if kind == "chest-ct" else "centroids.json"
    assert path == tmp_path / f"{kind}.{truth}" and path.is_file()  # beside the DICOM folder, not in it
    assert {p.suffix for p in out_dir.iterdir()} == {".dcm"}  # storescu --scan-directories sends all of it
    if kind == "chest-ct":
        rows = [r for r in path.read_text().splitlines() if r.strip()]
        assert len(rows) == 2, rows  # header + one nodule
    else:
        assert json.loads(path.read_text()), path  # vertebra centroids (VerSe-style JSON)


# -- rules test -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chest20(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-slice 64x64 synthetic chest CT (enough slices for the lung model's series preference)."""
    from training.synthetic import write_chest_ct_study

    study = write_chest_ct_study(tmp_path_factory.mktemp("chest20"), seed=4, slices=20, nodules=1, rows=64)
    return study.files[0].parent


def test_rules_test_shows_rule_and_model(tmp_path: Path, chest20: Path, smoke_models_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path, models_dir=str(smoke_models_dir), rules=RULES,
                    destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}])
    code, out, err = run_cli(capsys, "rules", "test", chest20, "--config", cfg)
    assert code == 0, out + err
    assert "chest-ct-nodules" in out and "lung_nodule_ct" in out, out
    assert re.search(r"lung_nodule_ct .*reads series .*-> pacs", out), out

    mr = tmp_path / "mr"
    mr.mkdir()
    for p in sorted(chest20.glob("*.dcm")):
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(mr / p.name, enforce_file_format=True)
    code, out, err = run_cli(capsys, "rules", "test", mr, "--config", cfg)
    assert code == 1, out + err
    assert "nothing routes" in out and "modality MR" in out, out


# -- send -----------------------------------------------------------------------------------------
@pytest.mark.integration
def test_send_delivers_every_file(tmp_path: Path, chest20: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scp = start_storescp(tmp_path / "dest", "DEST")
    try:
        code, out, err = run_cli(capsys, "send", "-aec", "DEST", "127.0.0.1", scp.port, chest20)
    finally:
        scp.stop()
    assert code == 0, out + err
    sent = {str(ds.SOPInstanceUID) for ds in dicom_files(chest20)}
    received = [str(ds.SOPInstanceUID) for ds in scp.datasets()]
    assert sorted(received) == sorted(sent)
    assert "sent 20" in out, out


def test_send_to_nobody_fails(tmp_path: Path, chest20: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.system import free_port

    code, out, err = run_cli(capsys, "send", "-aec", "DEST", "127.0.0.1", free_port(), chest20)
    assert code != 0, out


# -- jobs and models ------------------------------------------------------------------------------
@pytest.fixture
def populated(tmp_path: Path) -> tuple[Path, int, int]:
    """A config whose job store holds one QUEUED and one FAILED job: (config, queued id, failed id)."""
    cfg = write_cfg(tmp_path)
    store = Store(load_settings(cfg).db_path, durable=False)
    study = "1.2.826.0.1.3680043.10.99"
    sops = [f"{study}.2.{i}" for i in range(1, 4)]
    failed, _ = store.jobs.create(study_uid=study, model="lung_nodule_ct", model_version="1.0.0",
                                  series_uid=f"{study}.2", input_uids=sops, destinations=["pacs"], rule="chest")
    assert store.jobs.claim("w1", lease_s=60) is not None
    store.jobs.fail(failed, "infer", "BackendError: out of memory")
    queued, _ = store.jobs.create(study_uid=study, model="spine_vertebrae_ct", model_version="1.0.0",
                                  series_uid=f"{study}.2", input_uids=sops, destinations=["pacs"], rule="spine")
    store.close()
    return cfg, queued, failed


def test_jobs_list_show_replay(populated: tuple[Path, int, int], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, queued, failed = populated
    code, out, err = run_cli(capsys, "jobs", "--config", cfg, "list")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:2] == [str(queued), "QUEUED"] and lines[1].split()[:2] == [str(failed), "FAILED"]
    assert "infer" in lines[1] and "out of memory" in lines[1]

    code, out, _ = run_cli(capsys, "jobs", "--config", cfg, "list", "--state", "FAILED")
    assert code == 0 and [ln.split()[0] for ln in out.strip().splitlines()] == [str(failed)]

    code, out, err = run_cli(capsys, "jobs", "--config", cfg, "show", str(failed))
    assert code == 0, err
    job = json.loads(out)
    assert job["id"] == failed and job["state"] == "FAILED" and job["failed_stage"] == "infer"
    assert [e["to_state"] for e in job["events"]] == ["QUEUED", "RUNNING", "FAILED"]

    code, _, err = run_cli(capsys, "jobs", "--config", cfg, "show", "999")
    assert code == 1 and "999" in err

    code, out, err = run_cli(capsys, "jobs", "--config", cfg, "replay", str(failed))
    assert code == 0, err
    assert "QUEUED" in out  # no outputs yet: replay runs the job again
    code, _, err = run_cli(capsys, "jobs", "--config", cfg, "replay", str(queued))
    assert code == 2 and "QUEUED" in err, err  # only FAILED or DONE jobs can be replayed
    code, out, err = run_cli(capsys, "jobs", "--config", cfg, "show", str(failed))
    assert json.loads(out)["events"][-1]["actor"] == "cli", out  # the replay names who asked for it


def test_jobs_rerun(populated: tuple[Path, int, int], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, queued, failed = populated
    code, out, err = run_cli(capsys, "jobs", "rerun", str(failed), "--config", cfg)
    assert code == 0 and out.strip() == f"job {failed} -> QUEUED", err
    event = json.loads(run_cli(capsys, "jobs", "show", str(failed), "--config", cfg)[1])["events"][-1]
    assert (event["to_state"], event["detail"], event["actor"]) == ("QUEUED", "rerun", "cli")
    code, _, err = run_cli(capsys, "jobs", "rerun", str(queued), "--config", cfg)
    assert code == 2 and "QUEUED" in err, err


# -- token ----------------------------------------------------------------------------------------
def test_token_new_prints_a_token_and_the_entry_that_accepts_it(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    from dicom_gateway.api.auth import TokenBook

    code, out, err = run_cli(capsys, "token", "new", "ris-viewer", "--role", "operate")
    assert code == 0, err
    token = re.search(r"^token: (\S+)$", out, re.M).group(1)
    entry = yaml.safe_load(out)["api_tokens"][0]
    assert entry == {"name": "ris-viewer", "role": "operate", "sha256": hashlib.sha256(token.encode()).hexdigest()}
    assert token not in yaml.safe_dump(entry) and not list(tmp_path.iterdir())  # nothing stored
    settings = load_settings(write_cfg(tmp_path, api_tokens=[entry]))
    assert TokenBook(settings.api_tokens).identify(token).role == "operate"
    again = run_cli(capsys, "token", "new", "ris-viewer", "--role", "operate")[1]
    assert re.search(r"^token: (\S+)$", again, re.M).group(1) != token
    code, _, err = run_cli(capsys, "token", "new", "no spaces allowed")
    assert code == 2 and "no spaces allowed" in err, err
    code, _, err = run_cli(capsys, "token", "new", "x", "--role", "root")
    assert code == 2 and "invalid choice" in err, err


def test_jobs_without_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "jobs", "--config", write_cfg(tmp_path), "list")
    assert code == 2 and "no job store" in err, err


def test_models_lists_the_registered_model(tmp_path: Path, smoke_models_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path, models_dir=str(smoke_models_dir))
    code, out, err = run_cli(capsys, "models", "--config", cfg)
    assert code == 0, err
    assert out.startswith("lung_nodule_ct"), out
    code, again, err = run_cli(capsys, "models", "list", "--config", cfg)
    assert code == 0 and again == out, err


def test_models_doc_writes_a_page_per_card(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path, models_dir=str(REPO / "models"))
    code, out, err = run_cli(capsys, "models", "doc", "lung_nodule_ct", "--out", tmp_path / "pages", "--config", cfg)
    assert code == 0, err
    assert out.split() == [str(tmp_path / "pages" / "lung_nodule_ct.md")]
    page = (tmp_path / "pages" / "lung_nodule_ct.md").read_text()
    card = json.loads((REPO / "models" / "lung_nodule_ct" / "metadata.json").read_text())
    assert page.startswith("<!-- Generated") and f"# `lung_nodule_ct` version {card['version']}" in page
    assert "Not for clinical use" in page and card["training"]["command"] in page
    code, _, err = run_cli(capsys, "models", "doc", "no_such_model", "--out", tmp_path / "pages", "--config", cfg)
    assert code == 2 and "no_such_model" in err, err


def test_jobs_accepts_config_after_the_action(populated: tuple[Path, int, int],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`dxgate jobs replay ID --config cfg` (as the docs write it) works like `dxgate jobs --config cfg ...`."""
    cfg, _, failed = populated
    code, out, err = run_cli(capsys, "jobs", "list", "--config", cfg)
    assert code == 0, err
    code, out, err = run_cli(capsys, "jobs", "show", str(failed), "--config", cfg)
    assert code == 0 and json.loads(out)["id"] == failed, err
