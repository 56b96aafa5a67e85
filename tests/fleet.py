"""Run one function in several spawned processes at once and collect what each returns."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any


def _run(target: Callable[..., Any], args: tuple[Any, ...], results: Any) -> None:
    try:
        results.put(target(*args))
    except BaseException as error:  # tell the test at once, rather than let it wait
        results.put(RuntimeError(f"{type(error).__name__}: {error}"))
        raise


def in_processes(target: Callable[..., Any], args: tuple[Any, ...], processes: int) -> list[Any]:
    """`target(*args)` in `processes` spawned processes (a module-level function, picklable
    arguments); their results, in the order they came. A failed process fails the caller."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_run, args=(target, args, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=90) for _ in workers]
    for worker in workers:
        worker.join(30)
    for outcome in outcomes:
        if isinstance(outcome, RuntimeError):
            raise outcome
    return outcomes
