"""How the driver gets its workers: spawned on this machine, or started by `torchrun`.

Both give the driver one `WorkerHandle` per rank (send it commands, ask whether it is alive,
kill it) and put every message a worker sends — (kind, instance, payload) — into the
driver's inbox. With tensor parallelism an elastic instance is tp ranks (consecutive world
ranks); `instance_workers` makes their handles one handle per instance, as the driver wants.

- `spawn` (the default): one torch.multiprocessing process per device on this machine.
- `torchrun`: every process of the torchrun job runs the same command (`espc run DIR
  --launcher torchrun`, or an `Engine(..., launcher="torchrun")`). The process of RANK 0 is
  the driver: it listens on MASTER_ADDR:ESPC_DRIVER_PORT (MASTER_PORT + 1 by default),
  spawns worker 0 on its own node, and every other rank connects to it, receives the worker
  configuration and serves as worker RANK (`serve_worker`). The workers' process group
  forms over torchrun's rendezvous variables (`env://`); commands and results travel over
  the driver's connections, so nothing but the worker processes need the torch.distributed
  group. WORLD_SIZE must equal the devices of the spec's cluster (instances × tp).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Protocol, cast

import torch.multiprocessing as mp

from espc.runtime.worker import WorkerConfig, worker_main

AUTHKEY_ENV = "ESPC_AUTHKEY"
DRIVER_PORT_ENV = "ESPC_DRIVER_PORT"


class LaunchError(RuntimeError):
    """The workers cannot be started as asked."""


class WorkerHandle(Protocol):
    pid: int | None

    def send(self, command: Any) -> None: ...

    def exitcode(self) -> int | None:
        """None while the worker runs; its exit code (or -1 when unknown) once it is gone."""

    def kill(self) -> None: ...

    def join(self, timeout: float) -> None: ...


class _InstanceWorkers:
    """The tp ranks of one elastic instance as one handle: every command goes to each of
    them (they run the same graph on their shards), and the instance is gone as soon as any
    of its ranks is (the others would wait on it in their TP all-reduces)."""

    def __init__(self, ranks: list[WorkerHandle]):
        self.ranks = ranks
        self.pid = ranks[0].pid

    def send(self, command: Any) -> None:
        for rank in self.ranks:
            rank.send(command)

    def exitcode(self) -> int | None:
        return next((code for code in (rank.exitcode() for rank in self.ranks) if code is not None), None)

    def kill(self) -> None:
        for rank in self.ranks:
            rank.kill()

    def join(self, timeout: float) -> None:
        for rank in self.ranks:
            rank.join(timeout)


def instance_workers(ranks: list[WorkerHandle], tp: int) -> list[WorkerHandle]:
    """One handle per elastic instance of the world ranks' handles: instance i is ranks
    [i·tp, (i+1)·tp) (`espc.backend.tensor_parallel.world_rank`); tp = 1 keeps them as they are."""
    if tp == 1:
        return ranks
    return [_InstanceWorkers(ranks[start : start + tp]) for start in range(0, len(ranks), tp)]


# ------------------------------------------------------------------------------- spawn


class _LocalWorker:
    pid: int | None

    def __init__(self, process, commands):
        self.process, self.commands, self.pid = process, commands, None

    def send(self, command: Any) -> None:
        self.commands.put(command)

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def join(self, timeout: float) -> None:
        self.process.join(timeout)


def spawn_workers(config: WorkerConfig, ranks: range, inbox: queue.Queue) -> list[WorkerHandle]:
    """One process per rank on this machine; their messages go into `inbox`."""
    context = mp.get_context("spawn")
    results = context.Queue()
    handles: list[WorkerHandle] = []
    for rank in ranks:
        commands = context.Queue()
        process = context.Process(target=worker_main, args=(rank, config, commands, results), daemon=True)
        process.start()
        handle = _LocalWorker(process, commands)
        handle.pid = process.pid
        handles.append(handle)

    def forward() -> None:
        while True:
            try:
                inbox.put(results.get())
            except (EOFError, OSError, ValueError):
                return

    threading.Thread(target=forward, daemon=True, name="espc-results").start()
    return handles


# ----------------------------------------------------------------------------- torchrun


def torchrun_rank() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when this process was started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _driver_address() -> tuple[str, int]:
    port = int(os.environ.get(DRIVER_PORT_ENV, int(os.environ["MASTER_PORT"]) + 1))
    return os.environ["MASTER_ADDR"], port


def _authkey() -> bytes:
    # Every rank of one job shares torchrun's environment; the rendezvous port tells jobs apart.
    return os.environ.get(AUTHKEY_ENV, f"espc-{os.environ.get('MASTER_PORT', '')}").encode()


class _RemoteWorker:
    pid: int | None

    def __init__(self, connection: Connection, rank: int, inbox: queue.Queue):
        self.connection, self.rank, self.pid = connection, rank, None
        self._exitcode: int | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(inbox,), daemon=True, name=f"espc-worker-{rank}").start()

    def _read(self, inbox: queue.Queue) -> None:
        try:
            while True:
                inbox.put(self.connection.recv())
        except (EOFError, OSError):
            self._exitcode = -1

    def send(self, command: Any) -> None:
        with self._lock:
            try:
                self.connection.send(command)
            except OSError:
                self._exitcode = -1

    def exitcode(self) -> int | None:
        return self._exitcode

    def kill(self) -> None:
        """Close its connection: the worker exits when its command stream ends."""
        self._exitcode = self._exitcode if self._exitcode is not None else -1
        self.connection.close()

    def join(self, timeout: float) -> None:
        pass


def torchrun_workers(config: WorkerConfig, inbox: queue.Queue, timeout_s: float) -> list[WorkerHandle]:
    """In the driver (torchrun RANK 0): worker 0 spawned here, the others connected."""
    found = torchrun_rank()
    if found is None:
        raise LaunchError("launcher torchrun: RANK, WORLD_SIZE and MASTER_ADDR are not set; start the command with torchrun")
    rank, world = found
    if rank != 0:
        raise LaunchError(f"launcher torchrun: the driver runs on RANK 0, this is RANK {rank}")
    if world != config.world:
        raise LaunchError(
            f"launcher torchrun: WORLD_SIZE {world} ≠ the spec's {config.world} devices "
            f"({config.world // config.tp} instances × tp {config.tp}; one torchrun process per device: "
            "--nnodes × --nproc-per-node must equal it)"
        )
    listener = Listener(_driver_address(), authkey=_authkey())
    handles: list[WorkerHandle | None] = [None] * world
    handles[0] = worker0 = spawn_workers(config, range(1), inbox)[0]
    accepted = threading.Event()

    def accept() -> None:
        for _ in range(world - 1):
            connection = listener.accept()
            peer = connection.recv()
            connection.send(config)
            handles[peer] = _RemoteWorker(connection, peer, inbox)
        accepted.set()

    threading.Thread(target=accept, daemon=True, name="espc-accept").start()
    if not accepted.wait(timeout_s):
        missing = [r for r, h in enumerate(handles) if h is None]
        listener.close()
        worker0.kill()
        raise LaunchError(f"launcher torchrun: ranks {missing} did not connect to the driver within {timeout_s:g} s")
    listener.close()
    return cast("list[WorkerHandle]", handles)  # accept() has filled every rank's slot


class _ConnectionQueue:
    """The two ends `worker_main` uses (`get`, `put`, `close`, `join_thread`) over one connection."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self._lock = threading.Lock()  # the heartbeat thread sends too

    def get(self) -> Any:
        try:
            return self.connection.recv()
        except (EOFError, OSError):
            return None  # the driver went away or retired this worker: stop

    def put(self, message: Any) -> None:
        with self._lock:
            try:
                self.connection.send(message)
            except OSError:
                pass

    def close(self) -> None:
        pass

    def join_thread(self) -> None:
        self.connection.close()


def serve_worker(connect_timeout_s: float = 120.0) -> None:
    """A torchrun rank other than 0: connect to the driver and serve as worker RANK until the
    driver closes the connection (the process then exits)."""
    found = torchrun_rank()
    if found is None:
        raise LaunchError("serve_worker runs under torchrun (RANK, WORLD_SIZE and MASTER_ADDR unset)")
    rank, _ = found
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            connection = Client(_driver_address(), authkey=_authkey())
            break
        except OSError:
            if time.monotonic() > deadline:
                raise LaunchError(f"rank {rank}: no driver at {_driver_address()} within {connect_timeout_s:g} s") from None
            time.sleep(0.2)
    connection.send(rank)
    config = connection.recv()
    channel = _ConnectionQueue(connection)
    worker_main(rank, config, channel, channel)


__all__ = [
    "LaunchError", "WorkerHandle", "instance_workers", "serve_worker", "spawn_workers", "torchrun_rank", "torchrun_workers",
]
