"""`vv-serve`: the streaming speech service over an ENGINE_DIR (FastAPI + uvicorn, or Ray Serve).

    vv-serve --engine-dir ENGINE_DIR [--host 127.0.0.1] [--port 8000] [--voices DIR] [--max-batch 8]
             [--max-queue 64] [--backend auto|ort|trt] [--max-text-chars 4096] [--max-voice-seconds 60]
             [--request-timeout 300] [--write-timeout 30] [--no-voice-uploads] [--ray --replicas N]
             [--api-key KEY ... | --api-keys-file FILE | VV_SERVE_API_KEYS] [--allow-origin URL ...]
             [--allow-host NAME ...] [--header-timeout 10] [--body-timeout 60] [--max-connections 512]
             [--voice-memory-budget 256] [--insecure-no-key]

On a VibeVoice-Realtime ENGINE_DIR (manifest `model_family: vibevoice_streaming`) it serves that model: its
voices are the presets of the ENGINE_DIR (no --voices), and a WebSocket takes text while audio is made
(docs/SERVE.md).

It prints `vv-serve: listening on http://HOST:PORT` once the engine is loaded and the socket is bound
(`--port 0` picks a free port). SIGTERM (or Ctrl-C) stops admission (new requests: 503, then
connection refused), lets in-flight requests finish, stops the engine and exits 0. A client that
stops reading is cut off after --write-timeout seconds (its request cancelled, its connection aborted),
a request whose body is still coming is answered 503 at once, and the drain never waits longer than the
request timeout plus a margin.

Serving anything but a loopback address needs an API key (`--api-key`, `--api-keys-file`, or the
environment variable VV_SERVE_API_KEYS): without one vv-serve refuses to start, unless told
`--insecure-no-key`. Keys, origins, host names and the limits on slow clients: docs/SERVE.md.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

import click

from ..cli import _OneLineErrors
from ..errors import RuntimeInputError, one_line
from .security import KEYS_ENV

KEEP_ALIVE_S = 5          # an idle keep-alive connection is closed after this (uvicorn's own timer)


@click.command(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine-dir", required=True, type=click.Path(), metavar="ENGINE_DIR",
              help="Directory written by `vv-export onnx`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port, printed at start).")
@click.option("--voices", "voices_dir", type=click.Path(), default=None, metavar="DIR",
              help="Voice presets: every sound file in DIR, id = file name without extension (VibeVoice; a "
                   "VibeVoice-Realtime ENGINE_DIR has its own presets).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most requests generated together (each takes two LM rows).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Most requests waiting for rows; beyond it requests get 429.")
@click.option("--backend", type=click.Choice(["auto", "ort", "trt"]), default="auto", show_default=True,
              help="auto: TensorRT engines when ENGINE_DIR has usable ones, else ONNX Runtime.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--decode-frames", type=click.IntRange(min=1), default=None,
              help="VibeVoice-Realtime: most frames of a request the acoustic decoder takes per call [default: the "
                   "ENGINE_DIR's, 6]; a group's audio is sent together, so 1 gives the steadiest streams where "
                   "generation is barely faster than real time.")
@click.option("--max-text-chars", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Longest `input` / `script` accepted, in characters.")
@click.option("--max-voice-seconds", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Longest voice prompt accepted (uploads and presets), in seconds.")
@click.option("--max-voice-bytes", type=click.IntRange(min=1024), default=16 * 2 ** 20, show_default=True,
              help="Largest voice upload accepted, in bytes.")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="Seconds a request may take from admission to its last frame.")
@click.option("--write-timeout", type=click.FloatRange(min=0.01), default=30.0, show_default=True,
              help="Seconds a write to a client may block (a client that stops reading is cancelled).")
@click.option("--no-voice-uploads", "no_uploads", is_flag=True,
              help="Refuse POST /v1/voices (501): only the presets of --voices (always so with --ray).")
@click.option("--api-key", "api_keys", multiple=True, envvar=KEYS_ENV, metavar="KEY",
              help=f"An API key clients must send as 'Authorization: Bearer KEY' (repeatable; or the environment "
                   f"variable {KEYS_ENV}, keys separated by spaces). Visible to other users in the process list: "
                   f"prefer the variable or --api-keys-file.")
@click.option("--api-keys-file", type=click.Path(), default=None, metavar="FILE",
              help="API keys, one a line (blank lines and '#' comments skipped).")
@click.option("--insecure-no-key", is_flag=True,
              help="Serve a non-loopback --host without any API key (anyone who reaches it may use it).")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="URL",
              help="A web page origin (scheme://host[:port]) allowed to call the API from a browser; '*': any "
                   "(repeatable; default: only the service's own page).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="A host name the service answers to besides IP addresses, localhost and *.test "
                   "('*.example.com': its subdomains, '*': any; repeatable).")
@click.option("--header-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds a client has for a request's headers (from connecting or its previous response).")
@click.option("--body-timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds a client has for a request's body, from its headers.")
@click.option("--max-connections", type=click.IntRange(min=1), default=512, show_default=True,
              help="Most open connections; beyond, a new one is answered 503 and closed.")
@click.option("--voice-memory-budget", type=click.FloatRange(min=0.0, min_open=True), default=256.0,
              show_default=True, metavar="MIB",
              help="MiB of memory the uploaded voices of one API key may hold (all uploads without keys).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve with Ray Serve (extra `ray`): replicas of the same app, one per GPU where there are.")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="With --ray: fixed number of replicas [default: autoscale 1..number of GPUs or 2 on CPU].")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
@click.option("--debug", is_flag=True, help="Show tracebacks of start-up failures.")
def main(engine_dir, host, port, voices_dir, max_batch, max_queue, backend, threads, decode_frames, max_text_chars,
         max_voice_seconds, max_voice_bytes, request_timeout, write_timeout, no_uploads, api_keys, api_keys_file,
         insecure_no_key, allow_origins, allow_hosts, header_timeout, body_timeout, max_connections,
         voice_memory_budget, use_ray, replicas, log_level, debug):
    """Serve speech over HTTP: OpenAI-compatible /v1/audio/speech, scripts, voices, a web page at /."""
    from .app import Limits

    limits = Limits(max_text_chars=max_text_chars, max_voice_seconds=max_voice_seconds,
                    max_voice_bytes=max_voice_bytes, request_timeout_s=request_timeout,
                    write_timeout_s=write_timeout, voice_uploads=not no_uploads, header_timeout_s=header_timeout,
                    body_timeout_s=body_timeout, max_connections=max_connections,
                    voice_memory_budget=int(voice_memory_budget * 2 ** 20))
    try:
        if replicas is not None and not use_ray:
            raise RuntimeInputError("--replicas needs --ray")
        access = _access(host, api_keys, api_keys_file, insecure_no_key, allow_origins, allow_hosts)
        _check_inputs(engine_dir, voices_dir)
        if use_ray:
            try:
                from .ray_app import serve_forever
            except ImportError as exc:
                raise RuntimeInputError(f"--ray needs Ray Serve: pip install 'vibevoice-trt[ray]' ({exc})") from exc

            serve_forever(engine_dir=str(engine_dir), host=host, port=port, voices_dir=voices_dir,
                          max_batch=max_batch, max_queue=max_queue, backend=backend, threads=threads,
                          limits=limits, replicas=replicas, access=access, decode_frames=decode_frames)
        else:
            _serve(engine_dir, host, port, voices_dir, max_batch, max_queue, backend, threads, limits, log_level,
                   access, decode_frames)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 -- start-up failures are one line unless --debug
        if debug:
            raise
        if isinstance(exc, (RuntimeInputError, OSError, ImportError)):
            click.echo(f"error: {one_line(exc)}", err=True)
        else:
            click.echo(f"error: {type(exc).__name__}: {one_line(exc)} (run with --debug for details)", err=True)
        sys.exit(1)


def _access(host, api_keys, api_keys_file, insecure_no_key, allow_origins, allow_hosts):
    """The service's Access from the options; refuses a non-loopback address without keys."""
    from .security import Access, is_loopback, read_keys

    try:
        access = Access(read_keys(api_keys, api_keys_file), allow_origins, allow_hosts)
    except ValueError as exc:
        raise RuntimeInputError(str(exc)) from None
    if not access.keys_required and not is_loopback(host) and not insecure_no_key:
        raise RuntimeInputError(f"--host {host} is not a loopback address and no API key is set: anyone who "
                                f"reaches it could use the service; give --api-key, --api-keys-file or {KEYS_ENV} "
                                f"(or --insecure-no-key to serve it without keys all the same)")
    return access


def _check_inputs(engine_dir, voices_dir) -> None:
    if not Path(engine_dir).is_dir():
        raise RuntimeInputError(f"--engine-dir {engine_dir}: not a directory")
    if voices_dir is not None and not Path(voices_dir).is_dir():
        raise RuntimeInputError(f"--voices {voices_dir}: not a directory")


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening (port 0: a free one), inheritable by uvicorn's workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeInputError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _serve(engine_dir, host, port, voices_dir, max_batch, max_queue, backend, threads, limits, log_level, access,
           decode_frames=None):
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from .app import create_app
    from .connections import ConnectionWatch
    from .engines import open_engine
    from .realtime_routes import STREAM_PATH

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    sock = listening_socket(host, port)  # before loading: a taken port fails at once
    engine = open_engine(engine_dir, backend=backend, threads=threads, max_batch=max_batch, max_queue=max_queue,
                         voices_dir=voices_dir, max_voice_seconds=limits.max_voice_seconds,
                         decode_frames=decode_frames).start()
    app = create_app(engine, limits, access)
    service = app.state.service
    service.connections = watch = ConnectionWatch(limits, service.metrics)
    # proxy_headers off: scope["client"] stays the peer's address, which links a request to its
    # connection (deadlines, aborts); a proxy in front logs the clients' own addresses. A WebSocket message
    # (a text chunk of a streamed request) is bounded as an HTTP body is.
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", http=watch.protocol(AutoHTTPProtocol),
                            proxy_headers=False, server_header=False, timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=graceful_timeout(limits),
                            ws_max_size=limits.body_limit(STREAM_PATH))
    server = draining_server(config, service)
    service.abort_client = lambda client: abort_connection(server, client)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    keys = f"{access.key_count} API keys" if access.keys_required else "no API key"
    print(f"vv-serve: listening on http://{shown}:{bound[1]} ({engine.family}, {len(engine.voices.list())} voices, "
          f"max batch {max_batch}, max queue {max_queue}, {keys})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        # uvicorn returns once every connection is closed: nothing is in flight any more
        engine.close()
        sock.close()
    print("vv-serve: stopped", flush=True)


def graceful_timeout(limits) -> int | None:
    """Longest wait for in-flight requests at shutdown: a request ends within its timeout (plus the
    app's 30 s safety net) and every write within the write timeout; then uvicorn cancels what is left."""
    if limits.request_timeout_s is None:
        return None
    return int(limits.request_timeout_s + 30 + (limits.write_timeout_s or 0) + 10)


def abort_connection(server, client) -> bool:
    """Abort (RST, no flush) the uvicorn connection whose peer is `client` (scope["client"]); True if
    one was found. Run in the event loop's thread."""
    if client is None:
        return False
    for connection in list(server.server_state.connections):
        transport = getattr(connection, "transport", None)
        if transport is not None and tuple(getattr(connection, "client", None) or ()) == tuple(client):
            transport.abort()
            return True
    return False


def draining_server(config, service):
    """A uvicorn Server whose SIGTERM/SIGINT first stops admission (503), then shuts down gracefully
    (the listening socket closes, in-flight requests finish), and which returns normally afterwards
    instead of re-raising the signal (so the process ends with status 0)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not service.draining:
                logging.getLogger("vv_runtime.serve").info("signal %s: draining", sig)
            service.start_draining()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return DrainingServer(config)


if __name__ == "__main__":  # pragma: no cover
    main()
