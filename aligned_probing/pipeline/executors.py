"""Executors: run independent tasks here (`LocalExecutor`) or on a Ray cluster (`RayExecutor`).

The pipeline's stages are pure functions of (settings, input locations), so the same function can
run in this process or in a Ray worker on another machine. An executor maps a function over a list of
tasks and returns the results in task order; the results should be small (summaries, row counts),
because the data itself goes to the run directory and the activation store, never through the driver.

Ray is an optional extra: it is imported only when a `RayExecutor` first dispatches work, and asking
for it without Ray installed fails with the install command.

Example:
    >>> ex = get_executor("local")
    >>> ex.map(abs, [-1, 2, -3])
    [1, 2, 3]
    >>> ray_ex = get_executor("ray", address="auto", max_retries=2)  # doctest: +SKIP
    >>> ray_ex.map(probe_block, blocks, resources=Resources(num_cpus=1))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = [
    "EXECUTORS",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "Resources",
    "TaskResources",
    "get_executor",
    "import_ray",
]

T = TypeVar("T")
R = TypeVar("R")

#: Names accepted by `get_executor` (and by `runtime.executor` / `--executor`).
EXECUTORS: tuple[str, ...] = ("local", "ray")
RAY_INSTALL_HINT = "pip install 'aligned-probing[ray]'"


@dataclass(frozen=True)
class Resources:
    """What one task needs from a cluster node (Ray's logical resources; ignored when run locally).

    Attributes:
        num_cpus: CPU slots per task (fractions allowed, e.g. 0.5).
        num_gpus: GPUs per task (fractions share a GPU, e.g. 0.25 for four small models on one card).
        memory: Bytes of memory to reserve per task, or None for no reservation.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"Resources.{name} must be a number >= 0, got {value!r}.")
        if self.memory is not None and (not isinstance(self.memory, int) or self.memory <= 0):
            raise ValueError(f"Resources.memory must be a positive int (bytes) or None, got {self.memory!r}.")

    def ray_options(self) -> dict[str, Any]:
        """These resources as keyword options of Ray's `.options(...)`."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            options["memory"] = self.memory
        return options


#: `Resources` for every task, one per task, or None (one CPU each).
TaskResources = Resources | Sequence[Resources] | None


def per_task(resources: TaskResources, n_tasks: int) -> list[Resources]:
    """`resources` as one `Resources` per task.

    Raises:
        ValueError: A sequence whose length is not `n_tasks`.
    """
    if resources is None or isinstance(resources, Resources):
        return [resources or Resources()] * n_tasks
    resources = list(resources)
    if len(resources) != n_tasks:
        raise ValueError(
            f"resources must be one Resources or one per task ({n_tasks}), "
            f"got a sequence of {len(resources)}."
        )
    return resources


@runtime_checkable
class Executor(Protocol):
    """Maps a function over independent tasks and returns the results in task order."""

    name: str

    def map(self, fn: Callable[[T], R], tasks: Sequence[T], *, resources: TaskResources = None) -> list[R]:
        """`[fn(t) for t in tasks]`, possibly in parallel and elsewhere.

        Args:
            fn: A picklable function of one task (module-level, so that workers can import it).
            tasks: Picklable task descriptions: paths, keys, settings, never large arrays.
            resources: What each task needs: one `Resources` for all, one per task (so that model and
                CPU stages share a wave), or None for one CPU each.

        Returns:
            The results, in the order of `tasks`.
        """
        ...


class LocalExecutor:
    """Runs every task in this process, one after another (the default; needs no Ray).

    Tasks run in order, so a failure stops the map at the failing task, as a plain loop would.
    """

    name = "local"

    def map(self, fn: Callable[[T], R], tasks: Sequence[T], *, resources: TaskResources = None) -> list[R]:
        """`[fn(t) for t in tasks]`; `resources` is checked for interface parity, then ignored."""
        per_task(resources, len(tasks))
        return [fn(task) for task in tasks]

    def __repr__(self) -> str:
        return "LocalExecutor()"


def import_ray() -> ModuleType:
    """Import Ray, or fail with the command that installs it.

    Raises:
        ImportError: Ray is not installed; the message gives `pip install 'aligned-probing[ray]'`.
    """
    try:
        return importlib.import_module("ray")
    except ImportError as err:
        raise ImportError(
            f"executor='ray' needs Ray, which is not installed; install it with `{RAY_INSTALL_HINT}`, "
            "or use executor='local'."
        ) from err


class RayExecutor:
    """Dispatches each task as one Ray task, with Ray's retries for failed or killed workers.

    Connects to the cluster at `address` (or starts a local one when `address` is None and Ray is not
    initialised yet) on the first `map`, not at construction, so building a config or a plan never
    needs a cluster. An already initialised Ray (e.g. `ray.init(num_cpus=2)` in a notebook or a test)
    is used as it is.

    Retries: a task whose worker dies (killed, out of memory, node lost) is re-run up to
    `max_retries` times; with `retry_exceptions=True` a task that raises is re-run too. Retried
    tasks must therefore be idempotent: the pipeline's tasks write their output atomically or resume
    from what a killed attempt committed.

    Args:
        address: Ray cluster address (`"auto"`, `"ray://host:10001"`, `"host:6379"`), or None for
            the already initialised Ray or a new local one.
        max_retries: Re-runs of a task after a system failure (and, with `retry_exceptions`, after an
            exception); 0 disables retries.
        retry_exceptions: Also retry tasks that raise (True), or only those whose worker died (False).
        init_kwargs: More keyword arguments for `ray.init` when this executor starts or joins Ray.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        max_retries: int = 3,
        retry_exceptions: bool = True,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}.")
        self.address = address
        self.max_retries = max_retries
        self.retry_exceptions = retry_exceptions
        self.init_kwargs = dict(init_kwargs or {})

    def _ray(self) -> ModuleType:
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_kwargs)
        return ray

    def map(self, fn: Callable[[T], R], tasks: Sequence[T], *, resources: TaskResources = None) -> list[R]:
        """Submit one Ray task per item of `tasks`, wait for all, return the results in task order.

        A failing task does not stop its siblings: every task runs to its end (so that a re-run finds
        their committed output), then the first failure is raised.

        Raises:
            ray.exceptions.RayTaskError: A task still failed after its retries (it is also an
                instance of the task's own exception class, so `except ValueError` works).
        """
        tasks = list(tasks)
        needs = per_task(resources, len(tasks))
        if not tasks:
            return []
        ray = self._ray()
        remote = ray.remote(_as_function(fn))
        retries = {"max_retries": self.max_retries, "retry_exceptions": self.retry_exceptions}
        refs = [
            remote.options(**retries, **r.ray_options()).remote(t) for t, r in zip(tasks, needs, strict=True)
        ]
        try:
            outcomes = [_outcome(ray, ref) for ref in refs]
        except KeyboardInterrupt:
            for ref in refs:  # the driver was interrupted: do not leave the tasks running on the cluster
                ray.cancel(ref)
            raise
        failed = [value for ok, value in outcomes if not ok]
        if failed:
            raise failed[0]
        return [value for _, value in outcomes]

    def __repr__(self) -> str:
        return (
            f"RayExecutor(address={self.address!r}, max_retries={self.max_retries}, "
            f"retry_exceptions={self.retry_exceptions})"
        )


def _outcome(ray: ModuleType, ref: Any) -> tuple[bool, Any]:
    """`(True, result)` of a finished Ray task, or `(False, error)` when it failed after its retries."""
    try:
        return True, ray.get(ref)
    except ray.exceptions.RayError as err:
        return False, err


def _as_function(fn: Callable[[T], R]) -> Callable[[T], R]:
    """`fn` itself if it is a plain function, else a function calling it (Ray accepts only functions).

    Builtins, `functools.partial` objects and callable instances are wrapped, so that every callable
    the local executor takes works on Ray too.
    """
    if inspect.isfunction(fn):
        return fn

    def call(task: T) -> R:
        return fn(task)

    return call


def get_executor(
    name: str,
    *,
    address: str | None = None,
    max_retries: int = 3,
    retry_exceptions: bool = True,
) -> Executor:
    """The executor called `name`: `local` (this process) or `ray` (a Ray cluster).

    Args:
        name: One of `EXECUTORS`.
        address: Ray cluster address (only with `ray`; None = the initialised or a new local Ray).
        max_retries: Ray task retries (only with `ray`).
        retry_exceptions: Whether Ray also retries tasks that raise (only with `ray`).

    Raises:
        ValueError: Unknown name, or an address given for the local executor.
        ImportError: `ray` without Ray installed (the message gives the install command).
    """
    if name == "local":
        if address is not None:
            raise ValueError(
                f"address (ray_address) is only used with executor='ray', got address={address!r} "
                "with executor='local'."
            )
        return LocalExecutor()
    if name == "ray":
        import_ray()  # fail now, with the install hint, rather than at the first dispatch
        return RayExecutor(address, max_retries=max_retries, retry_exceptions=retry_exceptions)
    raise ValueError(f"executor must be one of {EXECUTORS}, got {name!r}.")
