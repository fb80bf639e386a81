"""`python -m vv_runtime.serve ...` is `vv-serve ...`."""

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
