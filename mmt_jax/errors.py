"""Errors the command line reports as one line (exit status 2) instead of a traceback."""


class TrainingError(RuntimeError):
    """A run that cannot go on: vocabulary mismatch, batch vs mesh, non-finite loss."""


class GinError(ValueError):
    """A gin file or binding that does not parse or names nothing."""


class UnknownTaskError(KeyError):
    """A task or mixture name that is not registered."""

    def __str__(self):
        return str(self.args[0])


class InputError(ValueError):
    """Inputs a model cannot take (a too-long text, an unreadable image, images preprocessed unlike
    the checkpoint's training); the message names the record and the field."""


class CheckpointError(ValueError):
    """Any checkpoint or weight file that cannot be read as what it claims to be (ours, Hugging
    Face, t5x, a PyTorch pickle); the message names the file and, where known, the tensor."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint that cannot be mapped onto the model: names the file or tensor at fault."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are not what was written (truncated, altered, missing) or that
    orbax cannot read back; names the checkpoint directory and the file at fault."""

    def __init__(self, checkpoint: str, file: str, reason: str):
        super().__init__(checkpoint, file, reason)
        self.checkpoint, self.file, self.reason = checkpoint, file, reason

    def __str__(self):
        return f"checkpoint {self.checkpoint} is corrupt: {self.file}: {self.reason}"


class ModelDirInUseError(RuntimeError):
    """Another run holds the model directory's lock."""
