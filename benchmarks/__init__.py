"""Runnable benchmarks (`python -m benchmarks <name>` or `dxgate bench <name>`): inference, ingest, e2e.

Each run saves JSON (machine info and every setting), a Markdown summary and PNG plots under
benchmarks/results/<machine>-<date>/ (or --out). Benchmarks are not tests; `--tiny` is the CI smoke size.
"""
