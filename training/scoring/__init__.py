"""Held-out scoring, the one home of it: `dxgate train` (both stages) and `dxgate evaluate` score here.

- `cases`: one generated case through the gateway's own preprocess and sliding window; FROC components;
- `heldout`: the first stage's held-out figures and operating point (`dxgate train lung-nodule|spine-vertebrae`);
- `served`: the lung pair's output as the gateway reports it, swept over its threshold (the second stage);
- `scored_cases`: the pair's cases scored in worker processes, cached per seed;
- `findings`: findings of a registered model against a datalist's truth (`dxgate evaluate`).
"""
