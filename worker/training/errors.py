"""Errors a training run reports to its caller; each message names the field or file at fault."""

from __future__ import annotations

from worker.training.formats import DataFormatError


class TrainingError(RuntimeError):
    """A run that cannot start or go on."""


class InvalidDataError(TrainingError):
    """train_file or validation_file is malformed; `report` lists every bad line."""

    def __init__(self, field: str, error: DataFormatError) -> None:
        super().__init__(f"{field}: {error}")
        self.field = field
        self.report = error.report


class UnusableDataError(TrainingError):
    """train_file or validation_file is well-formed but gives nothing to train or evaluate on."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
