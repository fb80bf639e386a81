"""vv-serve: the streaming speech service (FastAPI + uvicorn) over a `SpeechEngine`.

    from vv_runtime.serve import Limits, create_app
    app = create_app(engine, Limits(max_text_chars=4096))   # an ASGI app; `vv-serve` runs it with uvicorn

Endpoints, limits and errors: docs/SERVE.md. The Ray Serve deployment of the same app is
`vv_runtime.serve.ray_app` (optional extra `ray`).
"""

from .app import Limits, create_app

__all__ = ["Limits", "create_app"]
