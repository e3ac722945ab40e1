"""serve: the compiled policy behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from espc.cli.common import ArtifactDir, fail, load_artifact

if TYPE_CHECKING:
    from espc.runtime.engine import EngineOverrides

app = typer.Typer()

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@app.command()
def serve(
    artifact: ArtifactDir,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option(help="the model name clients send (default: the spec's model.name)")
    ] = None,
    kv_capacity: Annotated[int | None, typer.Option(help="KV tokens per instance (default: the spec's memory)")] = None,
    log_level: Annotated[str, typer.Option(help="the HTTP server's log level: " + ", ".join(_LOG_LEVELS))] = "info",
) -> None:
    """Serve the compiled policy over an OpenAI-compatible HTTP API: /v1/completions and
    /v1/chat/completions (streamed with server-sent events), /v1/models, /health and /metrics
    (Prometheus); admission control comes from the spec's `serving` section. Stops on Ctrl-C."""
    if not 0 <= port <= 65535:
        fail(f"--port {port}: expected 0..65535")
    if kv_capacity is not None and kv_capacity < 1:
        fail("--kv-capacity must be at least 1")
    if log_level not in _LOG_LEVELS:
        fail(f"--log-level {log_level!r}: expected one of {', '.join(_LOG_LEVELS)}")
    loaded = load_artifact(artifact)
    try:  # imported here: the web stack and torch load only for this verb
        from espc.runtime.server import bind, terminate_as_interrupt
        from espc.runtime.server import serve as serve_http
    except ImportError as error:
        fail(f"espc serve needs FastAPI and uvicorn ({error}): pip install fastapi uvicorn")
    terminate_as_interrupt()  # SIGTERM, even while the workers start, closes them like Ctrl-C
    from espc.runtime.driver import EngineError
    from espc.runtime.engine import Engine

    try:
        sock = bind(host, port)  # before the workers start: a busy port fails at once
    except OSError as error:
        fail(f"espc serve: cannot listen on {host}:{port}: {error.strerror or error}")
    name = served_model_name or loaded.spec.model.name
    overrides: EngineOverrides = {"kv_capacity": kv_capacity} if kv_capacity else {}
    console = Console(stderr=True)

    def ready(url: str) -> None:
        console.print(
            f"espc serve: {escape(name)} ({loaded.policy.strategy}, {loaded.spec.cluster.num_devices} workers) at {url}\n"
            f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{escape(name)}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
            highlight=False, soft_wrap=True,
        )

    try:
        with sock, Engine(loaded.spec, loaded.policy, base_dir=loaded.base_dir, **overrides) as engine:
            serve_http(engine, sock, model_name=name, log_level=log_level, on_ready=ready)
    except (EngineError, ValueError) as error:
        fail(f"espc serve: {error}")
    except KeyboardInterrupt:
        pass
