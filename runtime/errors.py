"""User-facing errors of the runtime: one line that names the problem, no traceback unless --debug."""


class RuntimeInputError(Exception):
    """A problem with the user's input (script, voices, ENGINE_DIR, output path) reported in one line."""
