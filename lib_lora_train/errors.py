"""Errors the hosts turn into clear messages (and the CLI into exit codes)."""


class LoraTrainError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(LoraTrainError):
    """A bad or unsupported configuration value (CLI exit code 2)."""


class DataError(LoraTrainError):
    """The dataset cannot be used as given (CLI exit code 2)."""


class ModelError(LoraTrainError):
    """The checkpoint cannot be loaded or is not of a supported family (CLI exit code 2)."""


class Interrupted(LoraTrainError):
    """The run was stopped on request; a resumable state was saved (CLI exit code 3)."""


class TrainingFailed(LoraTrainError):
    """The run stopped for a reason the user can act on (diverged loss, out of memory, disk full); the message
    says which setting to change. Files already saved are kept (CLI exit code 1)."""


class DiskFull(LoraTrainError):
    """A write failed because the disk is full; what was written before is complete, nothing partial is left."""
