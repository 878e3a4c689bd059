"""The errors archfx raises. Each carries a one-line message that says what to do."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """`Type: first line of the message` (the line cut to `limit` characters), for wrapping a
    library's exception into one of ours."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit]}" if text else type(exc).__name__


class ArchfxError(Exception):
    """Base class: a problem with the user's input or with a rewrite, explained in one line."""


class CaptureError(ArchfxError):
    """The model could not be captured as a graph."""


class AnalysisError(ArchfxError):
    """The captured graph does not have a structure archfx can recognise."""


class PassError(ArchfxError):
    """A pass could not run, or its options are invalid."""


class PassFailure(ArchfxError):
    """A pass broke on this model in a way it does not check for: a bug in archfx, not a
    refusal. The message names the reproducer to report."""


class VerificationError(ArchfxError):
    """A rewrite that claims to preserve the function did not, or the graph is malformed."""


class LoweringError(ArchfxError):
    """torch.compile or ONNX export failed, or its result disagrees with PyTorch."""


class ModelSpecError(ArchfxError):
    """MODEL (a directory, built-in name or module:callable) could not be loaded."""


class ArtifactError(ArchfxError):
    """A saved archfx model directory is missing, corrupted or mismatched."""


class OnnxMismatchError(LoweringError):
    """The exported ONNX model does not compute the graph's function (its fp64 run disagrees
    with PyTorch's) or computes it too imprecisely in fp32. `result` is the `OnnxResult`."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
