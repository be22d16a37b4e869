"""`dxgate synth chest-ct|spine-ct`: write a synthetic study (demo and test data, never patient data)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("synth", help="write a synthetic study and its truth file (needs the train extra)",
                        description=__doc__)
    sp.add_argument("kind", choices=["chest-ct", "spine-ct"], help="chest CT with lung nodules, or spine CT")
    sp.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="folder for the DICOM files only; the truth goes beside it (DIR.annotations.csv for "
                         "chest-ct, DIR.centroids.json for spine-ct)")
    sp.add_argument("--slices", type=int, default=None, help="number of axial slices (default: the generator's)")
    sp.add_argument("--nodules", type=int, default=3, help="chest-ct: number of nodules to insert")
    sp.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same study")
    sp.add_argument("--rows", type=int, default=512, help="rows and columns of each slice")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.synthetic import write_chest_ct_study, write_spine_ct_study

    kwargs = {"seed": args.seed, "rows": args.rows}
    if args.slices is not None:
        kwargs["slices"] = args.slices
    if args.kind == "chest-ct":
        study = write_chest_ct_study(args.out, nodules=args.nodules, **kwargs)
    else:
        study = write_spine_ct_study(args.out, **kwargs)
    print(f"wrote {len(study.files)} instances of study {study.study_uid} to {args.out}")
    print(f"annotations: {study.annotations_path}")  # beside the folder, which holds DICOM files only
    return 0
