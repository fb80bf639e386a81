"""User-facing errors: one line, naming the problem, no traceback unless --debug."""

from vv_engine_dir import one_line  # noqa: F401  re-exported: how every error of this package shows a cause


class ExportError(Exception):
    """A problem with the user's input or environment that the exporter reports in one line."""


class ValidationError(ExportError):
    """An exported graph disagrees with PyTorch beyond its stated tolerance."""


class TrtUnavailable(ExportError):
    """TensorRT engines cannot be built or run here: TensorRT is not installed, or there is no CUDA GPU."""
