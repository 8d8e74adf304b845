"""Errors a user can cause. The CLI turns them into `Error: ...` and exit 1."""


class GataError(Exception):
    """Base class: the message says what was expected, what was found, and how to fix it."""


class ConfigError(GataError):
    """A hyperparameter, flag or environment variable has a bad value."""


class DataError(GataError):
    """Training or test data failed validation."""


class ModelError(GataError):
    """The base model or a checkpoint cannot be used."""


class ArtifactError(GataError):
    """A model artifact (tarball or directory) is missing, corrupt or of an unknown format."""


class JobInterrupted(GataError):
    """SIGTERM (a spot interruption) arrived; a checkpoint was saved for the restarted job."""


class WorkerFailed(GataError):
    """A training worker failed and wrote the failure file itself; keep its reason."""


class ExportError(GataError):
    """The ONNX export, quantization or parity gate failed."""


class StorageError(GataError):
    """A folder the job writes to is not writable, or has too little free space."""


class RoutingError(GataError):
    """The routed accuracy on the test set misses the target and strict_routing is set."""


class PromotionError(GataError):
    """The new model is worse than the one in service, and require_improvement is set."""


class Terminated(BaseException):
    """SIGTERM arrived outside the training loop (which checkpoints and stops by itself).

    A BaseException, like KeyboardInterrupt: `except Exception` around library code
    (which rewords or swallows what it catches) lets it through, so the reason stays
    SIGTERM; `failure.guard` reports it.
    """
