"""Errors raised by momcompress. The CLI turns each into a one-line message and a non-zero exit."""


class MomcompressError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class ModelLoadError(MomcompressError):
    """The model path is missing, not a model, or corrupt."""


class UnsupportedArchitectureError(MomcompressError):
    """The model's architecture has no adapter (see momcompress.models.SUPPORTED_MODEL_TYPES)."""


class DataError(MomcompressError):
    """Calibration or evaluation data is missing, empty, unreadable or too small."""


class ConfigError(MomcompressError):
    """An option or config file value is invalid."""


class RunDirError(MomcompressError):
    """An output or run folder is in the wrong state (exists, missing, incomplete, corrupt)."""


class TrainingDivergedError(MomcompressError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ExportError(MomcompressError):
    """A model cannot be exported as asked (wrong input folder, option, missing optional dependency)."""


class ExportCheckError(ExportError):
    """The exported model failed one of its own checks against PyTorch; nothing was written."""


class TargetMissedError(ConfigError):
    """A method's fitted threshold misses its activation-ratio target by more than the tolerance
    (momcompress.ratio_rule: the same rule for MoM and every baseline)."""


class FreezeCheckError(MomcompressError):
    """The frozen model does not reproduce the learned model within the tolerance of its dtype."""
