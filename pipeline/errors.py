"""The few named errors of superres.

Every error carries the pipeline `stage` it happened in, a short machine `code`, a message for people,
and whether a retry can help (`retryable`). That one flag decides exit codes, the failed/ record and,
for queues, whether a message is retried.
"""


class SuperresError(Exception):
    """Base of all superres errors."""

    retryable = False
    default_stage = "pipeline"
    default_code = "error"

    def __init__(self, message: str, *, stage: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.stage = stage or self.default_stage
        self.code = code or self.default_code


class ConfigError(SuperresError):
    """Settings, model files or the device are unusable: stop at start (exit 2)."""

    default_stage = "config"
    default_code = "bad_config"


class InputRejected(SuperresError):
    """This input can never be processed as it is (bad, too big, unsupported): set aside, never retried."""

    default_code = "rejected"


class TransientError(SuperresError):
    """Something that may work on a later try (I/O, a busy claim, a network blip)."""

    retryable = True
    default_code = "transient"


class ModelFileError(ConfigError):
    """A model file is missing, truncated or does not match its checksum."""

    default_stage = "model"
    default_code = "bad_model_file"


class DownloadError(SuperresError):
    """`models pull` could not fetch a verified copy of a model."""

    default_stage = "download"
    default_code = "download_failed"


class DeviceOutOfMemory(TransientError):
    """The accelerator ran out of memory on this piece of work: smaller tiles may fit."""

    default_stage = "upscale"
    default_code = "device_out_of_memory"


class EngineFailure(TransientError):
    """The engine failed on an input that passed every limit (out of memory after the last shrink, a CUDA
    error): the engine's trouble, not the input's. The item is given back, never filed as failed, and a
    long-running process reports itself unhealthy and exits so that it is restarted."""

    default_stage = "upscale"
    default_code = "engine_failed"
