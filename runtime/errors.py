"""User-facing errors of the runtime: one line that names the problem, no traceback unless --debug."""

from vv_engine_dir import one_line  # noqa: F401  re-exported: how every error of this package shows a cause


class RuntimeInputError(Exception):
    """A problem with the user's input (script, voices, ENGINE_DIR, output path) reported in one line."""


class CapacityError(RuntimeInputError):
    """A request the loaded engines cannot hold (beyond the plan's optimisation profiles: rows, context,
    prompt length). The request is fine in itself: a service answers 503 (retry later / elsewhere), the CLI
    names the plan limit and the fix (rebuild with a larger plan)."""


class BackendFault(Exception):
    """A graph execution that failed for a reason that is not the request's (TensorRT execution error,
    out of device memory). One line; a service answers 500 as JSON and the other requests go on."""
