"""User-facing errors. Each carries the process exit code the CLI uses, so batch schedulers can tell causes apart."""
from __future__ import annotations

__all__ = [
    "QuantEaseError",
    "UsageError",
    "ModelNotFound",
    "UnsupportedModel",
    "DataError",
    "CheckpointError",
    "NumericalError",
    "ResourceError",
    "SweepError",
    "DistributedError",
]


class QuantEaseError(Exception):
    """Base class: a problem with the user's input or environment, reported as one line without a traceback."""

    exit_code = 1


class UsageError(QuantEaseError, ValueError):
    """Invalid settings (bits, group size, method options...)."""

    exit_code = 2


class ModelNotFound(QuantEaseError):
    exit_code = 3


class UnsupportedModel(QuantEaseError):
    exit_code = 4


class DataError(QuantEaseError):
    """Calibration or evaluation data missing or too short."""

    exit_code = 5


class CheckpointError(QuantEaseError):
    """An output folder that is incomplete, corrupt, or would be overwritten."""

    exit_code = 6


class NumericalError(QuantEaseError):
    """NaN/Inf in weights or activations."""

    exit_code = 7


class ResourceError(QuantEaseError):
    """Out of memory or disk."""

    exit_code = 8


class SweepError(QuantEaseError):
    """Some runs of a sweep failed (the others finished)."""

    exit_code = 9


class DistributedError(QuantEaseError):
    """A multi-process run lost a rank (killed, failed or hung) or could not form its process group."""

    exit_code = 10
