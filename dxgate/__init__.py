"""The `dxgate` command line: one module per command group, `dxgate.main` the one entry point."""

from dicom_gateway import __version__

__all__ = ["__version__"]
