"""Training: the MONAI pipeline that makes the shipped models (`dxgate train`) and scores them (`dxgate evaluate`).

- data: `synthetic` (generated chest / spine CTs, DICOM writers), `datasets` (NIfTI + datalist), `loaders`
  (LUNA16, VerSe, Tianchi, MONAI datalists), `transforms`, `nodule_insertion`;
- first stage: `config` (the recipe), `networks`, `losses`, `train` (the loop), `first_stage` (card fields,
  held-out figures, timing, registration);
- the lung model's second stage: `candidate_classifier`, `second_stage`; both stages in one command: `lung_model`;
- `scoring` (held-out figures of every command), `metrics` (FROC, VerSe, keypoints), `export` (ONNX with a parity
  check), `register` (a model folder under models/), `workflow` (what `dxgate train` runs), `evaluate`.

Imports `inference` (the model card, the served pre- and postprocessing) but never `dicom_gateway`.
"""
