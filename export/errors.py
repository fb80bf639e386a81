"""User-facing errors: one line, naming the problem, no traceback unless --debug."""


class ExportError(Exception):
    """A problem with the user's input or environment that the exporter reports in one line."""


class ValidationError(ExportError):
    """An exported graph disagrees with PyTorch beyond its stated tolerance."""


class TrtUnavailable(ExportError):
    """TensorRT engines cannot be built or run here: TensorRT is not installed, or there is no CUDA GPU."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (whitespace runs, newlines included, become one space), or its
    type name when it has no message: what every one-line error of this package shows of a cause."""
    return " ".join(str(exc).split()) or type(exc).__name__
