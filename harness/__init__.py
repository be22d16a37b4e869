"""The one test harness, shared by the unit tests, the integration tests and the benchmarks.

- `system`: a free loopback port, the system tools (never the virtualenv's look-alike scripts), stopping
  a process this harness started.
- `ct`: synthetic CT Image Storage series (PS3.3 A.3), all written by `training.synthetic.dicom_writer`.
- `dcmtk`: dcmtk peers on 127.0.0.1 (`storescp` into a folder, `storescu`, `echoscu`).
- `gateway`: `python -m dxgate serve --config FILE` on free loopback ports, its API, its stop.
- `orthanc`: a real Orthanc as the PACS; `triton_server`: a real Triton Inference Server.
- `tls`: a test PKI made with openssl, dcmtk peers over TLS.
- `hostile`: raw PDUs (PS3.8 9.3) and misbehaving peers; `payloads`: hostile data sets (deep nesting, a
  Deflate bomb).
- `models`: model folders prepared for a test (a lung model whose threshold yields a finding on a study).

Imports go one way: the harness may import `dicom_gateway`, `inference` and `training`; none of those
imports the harness. Nothing here imports pytest: a missing tool raises `ToolMissing`, which the tests'
conftest turns into a skip.
"""
