"""The app (`create_app`) and serving it: `bind` a socket, `serve` it until Ctrl-C or
SIGTERM (`espc serve`), or run it in a `ServerThread`."""

from __future__ import annotations

import functools
import signal
import socket
import threading
import time
from collections.abc import Callable

from fastapi import FastAPI

from espc._version import __version__
from espc.runtime.engine import Engine
from espc.runtime.server.errors import add_error_handlers
from espc.runtime.server.metrics import ServerMetrics
from espc.runtime.server.routes import ServerState, add_routes
from espc.runtime.server.schemas import openapi_schema


def create_app(engine: Engine, *, model_name: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (started; the caller starts and closes it)."""
    state = ServerState(engine, model_name or engine.spec.model.name, int(time.time()), ServerMetrics())
    app = FastAPI(
        title="espc", version=__version__,
        description=f"OpenAI-compatible completions of {state.served}, served by espc's elastic sequence-parallel runtime.",
    )
    app.state.server = state
    app.state.engine, app.state.metrics = engine, state.metrics  # for whoever holds the app (the tests read the metrics)
    # FastAPI's documented way to extend the schema: replace the app's `openapi` method.
    app.openapi = functools.partial(  # type: ignore[method-assign]
        openapi_schema, app, state.served, engine.spec.model.max_context, engine.spec.model.vocab,
    )
    add_error_handlers(app)
    add_routes(app)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. Raises OSError."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _config(app: FastAPI, sock: socket.socket, log_level: str):
    import uvicorn

    host, port = sock.getsockname()[:2]
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )


class ServerThread:
    """Serve an app with uvicorn from a background thread (tests, benchmarks, notebooks):

        with ServerThread(create_app(engine)) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.socket = bind(host, port)
        self.server = uvicorn.Server(_config(app, self.socket, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True, name="espc-http")
        host, port = self.socket.getsockname()[:2]
        self.url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def terminate_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, as Ctrl-C does, so that the
    engine's `with` block closes the workers. uvicorn shuts down gracefully on SIGTERM and
    then raises the signal again; with the default handler that would kill the process and
    leave the worker processes behind."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def serve(
    engine: Engine, sock: socket.socket, *, model_name: str | None = None, log_level: str = "info",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve `engine` (started) on a bound socket until Ctrl-C or SIGTERM, which end in a
    graceful shutdown and then KeyboardInterrupt (close the engine on the way out); what
    `espc serve` runs."""
    import uvicorn

    app = create_app(engine, model_name=model_name)
    server = uvicorn.Server(_config(app, sock, log_level))
    terminate_as_interrupt()
    if on_ready is not None:
        host, port = sock.getsockname()[:2]
        on_ready(f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}")
    server.run(sockets=[sock])
