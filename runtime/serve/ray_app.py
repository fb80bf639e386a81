"""vv-serve beyond one machine: the same FastAPI app as a Ray Serve deployment (extra `ray`).

Each replica owns one engine (`SpeechEngine`, or `RealtimeEngine` for a VibeVoice-Realtime ENGINE_DIR: one
pipeline, one GPU where the cluster has GPUs: `num_gpus=1`, else one CPU) and serves the app of
`create_app`; Ray's HTTP proxy routes requests to the replica with the fewest ongoing requests and
autoscales the replica count on ongoing requests per replica (target: `max_batch`, the rows one engine
generates together). Every speech response names its replica in
`X-Replica-Id`. Voice uploads are off (POST /v1/voices: 501): an uploaded voice would live on the one
replica that took it; the voices of `--voices DIR` are loaded by every replica.

Started by one command, either

    vv-serve --engine-dir ENGINE_DIR --voices DIR --ray [--replicas N] [--port 8000]
    serve run vv_runtime.serve.ray_app:build_app engine_dir=ENGINE_DIR voices=DIR replicas=N

(`vv-serve --ray` starts a local Ray instance, or joins the cluster of RAY_ADDRESS; without
`--replicas` it autoscales from 1 to the number of GPUs, or 2 CPU replicas.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from ray import serve

from ..errors import RuntimeInputError
from .app import Access, Limits, create_app
from .engines import open_engine

DEPLOYMENT = "vv-serve"


@serve.deployment(name=DEPLOYMENT, graceful_shutdown_wait_loop_s=2.0, graceful_shutdown_timeout_s=600.0)
@serve.ingress()
class SpeechReplica:
    """One replica: an engine (`open_engine`) and the vv-serve app over it."""

    def __init__(self, config: dict):
        # uploads are off: a voice uploaded to one replica would be unknown to the others
        limits = Limits(**{**config["limits"], "replica_id": _replica_id(), "voice_uploads": False})
        self.engine = engine = open_engine(
            config["engine_dir"], backend=config.get("backend", "auto"), threads=config.get("threads"),
            max_batch=config["max_batch"], max_queue=config["max_queue"], voices_dir=config.get("voices_dir"),
            max_voice_seconds=limits.max_voice_seconds, decode_frames=config.get("decode_frames")).start()
        self.vv_app = create_app(engine, limits, config.get("access"))

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            # the proxy stops routing here and waits for ongoing requests first (graceful_shutdown_*)
            app.state.service.start_draining()
            engine.close()

        self.vv_app.router.lifespan_context = lifespan

    def __serve_build_asgi_app__(self):
        return self.vv_app


def _replica_id() -> str:
    try:
        context = serve.get_replica_context()
    except Exception:  # noqa: BLE001 -- outside a replica
        return f"pid-{os.getpid()}"
    replica = getattr(context, "replica_id", None)
    unique = getattr(replica, "unique_id", None) or getattr(context, "replica_tag", None)
    return f"{DEPLOYMENT}#{unique or os.getpid()}"


def deployment_options(replicas: int | None, max_batch: int, max_queue: int, gpus: float) -> dict:
    """Ray Serve options: a GPU per replica where there are GPUs, else a CPU; fixed or autoscaled count."""
    options = {
        "ray_actor_options": {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1},
        # beyond rows + queue the replica's own engine answers 429; Ray's router queues no further
        "max_ongoing_requests": max_batch + max_queue,
    }
    if replicas is not None:
        options["num_replicas"] = int(replicas)
    else:
        options["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": int(gpus) if gpus >= 1 else 2,
            "target_ongoing_requests": max_batch,
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 120.0,
        }
    return options


def build(engine_dir, voices_dir=None, max_batch: int = 8, max_queue: int = 64, backend: str = "auto",
          threads: int | None = None, limits: Limits | None = None, replicas: int | None = None,
          gpus: float | None = None, access: Access | None = None, decode_frames: int | None = None):
    """The bound Ray Serve application (ray.init must have run, or gpus be given); `access`: API keys,
    origins and host names (it holds digests of the keys, not the keys)."""
    import ray

    if gpus is None:
        gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    limits = limits or Limits()
    fields = {k: getattr(limits, k) for k in ("max_text_chars", "max_voice_seconds", "max_voice_bytes",
                                              "max_voices", "voice_memory_budget", "max_speakers",
                                              "request_timeout_s", "write_timeout_s", "body_timeout_s",
                                              "retry_after_s")}
    config = {"engine_dir": str(Path(engine_dir).resolve()),
              "voices_dir": None if voices_dir is None else str(Path(voices_dir).resolve()),
              "max_batch": int(max_batch), "max_queue": int(max_queue), "backend": backend,
              "threads": threads, "limits": fields, "access": access, "decode_frames": decode_frames}
    return SpeechReplica.options(**deployment_options(replicas, max_batch, max_queue, gpus)).bind(config)


def build_app(args: dict):
    """`serve run vv_runtime.serve.ray_app:build_app engine_dir=... [voices=DIR] [replicas=N] [max_batch=8]
    [max_queue=64] [backend=auto] [threads=N]`."""
    def number(key, kind, default=None):
        return default if args.get(key) in (None, "") else kind(args[key])

    if "engine_dir" not in args:
        raise ValueError("build_app needs engine_dir=ENGINE_DIR")
    return build(args["engine_dir"], args.get("voices") or None, number("max_batch", int, 8),
                 number("max_queue", int, 64), args.get("backend", "auto"), number("threads", int),
                 replicas=number("replicas", int))


def serve_forever(engine_dir, host: str, port: int, voices_dir, max_batch: int, max_queue: int, backend: str,
                  threads, limits: Limits, replicas: int | None, access: Access | None = None,
                  decode_frames: int | None = None) -> None:
    """`vv-serve --ray`: start (or join) Ray, run the app behind Ray's HTTP proxy on host:port until
    SIGTERM/SIGINT, then shut Serve down (replicas drain their ongoing requests first)."""
    import ray

    if port == 0:
        raise RuntimeInputError("--ray needs a fixed --port (Ray's proxy cannot pick a free one)")
    stop = threading.Event()
    previous = {}
    try:
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=False)
            else:
                ray.init(num_cpus=max(os.cpu_count() or 1, replicas or 2), include_dashboard=False,
                         object_store_memory=256 * 2 ** 20, log_to_driver=False)
        # after ray.init, which installs its own handlers
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        serve.start(http_options={"host": host, "port": int(port)})
        app = build(engine_dir, voices_dir, max_batch, max_queue, backend, threads, limits, replicas, access=access,
                    decode_frames=decode_frames)
        serve.run(app, name=DEPLOYMENT, route_prefix="/")
        gpus = float(ray.cluster_resources().get("GPU", 0))
        count = f"{replicas} replicas" if replicas else "autoscaled replicas"
        print(f"vv-serve: listening on http://{host}:{port} (Ray Serve, {count}, "
              f"{'one GPU' if gpus >= 1 else 'one CPU'} each)", flush=True)
        while not stop.wait(0.5):
            pass
        print("vv-serve: draining (Ray Serve shutdown)", flush=True)
        serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ray.is_initialized():
            ray.shutdown()
    print("vv-serve: stopped", flush=True)
