"""Errors of the gateway. DIMSE statuses are decided in `dimse_status`, HTTP in the API, nowhere else."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration file or a DXGATE_* variable is wrong; the message names the key."""


class SpoolFullError(GatewayError):
    """Free disk under the spool is below the watermark (PS3.4 C.4.2.1.5 status 0xA700)."""


class UnparsableDatasetError(GatewayError):
    """The received dataset cannot be read far enough to identify it (status 0xC210)."""


class MissingIdentifierError(UnparsableDatasetError):
    """Study/Series/SOP Instance UID missing from the dataset (status 0xC211)."""


class UnknownCallingAEError(GatewayError):
    """The calling AE title is not in the allow-list (association rejected)."""


class StateError(GatewayError):
    """A state change not allowed by its transition table (dicom_gateway.states); HTTP 409."""


class JobStateError(StateError):
    """A job transition not allowed by JOB_TRANSITIONS, or a job that is not in the state expected."""


class LeaseLostError(JobStateError):
    """A worker wrote to a job whose lease another worker has taken over: its results are dropped."""


class StudyStateError(StateError):
    """A study state change not allowed by STUDY_TRANSITIONS."""


class DeliveryStateError(StateError):
    """A delivery state change not allowed by DELIVERY_TRANSITIONS."""


class SchemaVersionError(GatewayError):
    """The job store's schema is newer than this version of dxgate knows (a downgrade is refused)."""


class NotFoundError(GatewayError):
    """A job or study the request names does not exist (HTTP 404)."""


class DeliveryError(GatewayError):
    """A destination refused or could not be reached for a C-STORE."""


class DatasetTooLargeError(GatewayError):
    """A received data set (or its inflated Deflate stream) is over limits.max_dataset_mb (status 0xA700)."""


# PS3.4 Annex B.2.3 / C.4.2.1.5 status codes used by the Storage SCP.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_MISSING_IDENTIFIER = 0xC211
STATUS_PROCESSING_FAILURE = 0x0110


def dimse_status(exc: BaseException | None) -> int:
    """The one place an exception becomes a C-STORE response status."""
    if exc is None:
        return STATUS_SUCCESS
    if isinstance(exc, SpoolFullError | DatasetTooLargeError):
        return STATUS_OUT_OF_RESOURCES
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC: the disk filled during the write
        return STATUS_OUT_OF_RESOURCES
    if isinstance(exc, MissingIdentifierError):
        return STATUS_MISSING_IDENTIFIER
    if isinstance(exc, UnparsableDatasetError):
        return STATUS_CANNOT_UNDERSTAND
    return STATUS_PROCESSING_FAILURE
