"""Independent simulations on every core: `fork_map` runs a function over items in forked
copies of the compiling process.

Compile's candidates are closures over the evaluator's state (its cost model, workloads and
caches), which pickle badly and would cost more to send than to rebuild; a forked child
inherits all of it as it is at the call. Only the items' results travel back (pickled over a
pipe). The results, and so the compile's decisions, are the same for any number of workers:
callers only parallelise work whose inputs are fixed before it starts.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def available_workers() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def fork_map(function: Callable[[Item], Result], items: Sequence[Item], workers: int) -> list[Result]:
    """[function(item) for item in items] on `workers` processes: this one and workers − 1
    forked children, each taking the next item not taken yet (items differ in cost).
    Sequential with one worker or one item, inside another fork_map (no nesting: every
    core is taken already) and where the platform cannot fork. A child's exception is raised here
    with its traceback."""
    global _mapping
    workers = min(workers, len(items))
    if workers <= 1 or _mapping or "fork" not in multiprocessing.get_all_start_methods():
        return [function(item) for item in items]
    context = multiprocessing.get_context("fork")
    taken = context.Value("l", 0)  # the next item's index, shared
    children = []
    for _ in range(1, workers):
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_child, args=(function, items, taken, sender), daemon=True)
        child.start()
        sender.close()
        children.append((child, receiver))
    results: dict[int, Result] = {}
    try:
        _mapping = True
        results.update(_take(function, items, taken))
        for child, receiver in children:
            try:
                ok, payload = pickle.loads(receiver.recv_bytes())
            except EOFError:
                child.join()
                raise RuntimeError(f"a compile worker died (exit code {child.exitcode})") from None
            if not ok:
                raise RuntimeError(f"a compile worker failed:\n{payload}")
            results.update(payload)
    finally:
        _mapping = False
        for child, receiver in children:
            receiver.close()
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    return [results[index] for index in range(len(items))]


_mapping = False  # in a fork_map's function, here or in a child


def _take(function: Callable[[Item], Result], items: Sequence[Item], taken) -> list[tuple[int, Result]]:
    done: list[tuple[int, Result]] = []
    while True:
        with taken.get_lock():
            index = taken.value
            taken.value += 1
        if index >= len(items):
            return done
        done.append((index, function(items[index])))


def _child(function: Callable[[Item], Result], items: Sequence[Item], taken, sender) -> None:
    global _mapping
    _mapping = True
    message: tuple[bool, object]
    try:
        message = (True, _take(function, items, taken))
    except BaseException:  # noqa: BLE001 — reported to the parent, which raises it
        message = (False, traceback.format_exc())
    sender.send_bytes(pickle.dumps(message))
    sender.close()
