"""The narrow interfaces between the engine's parts (``typing.Protocol``).

``engine.Engine`` makes the host workers (``poller``), the jobs (``jobs``) and
serves the views (``views``); each of them sees only what it needs of the
engine, and the jobs and views only what they need of a host's worker, so that
none of them imports ``engine.py`` or ``poller.py``, not even for the type
checker (``tests/test_structure.py``):

* ``HostView``: what the views show of a polled host (the console, the metrics
  and the health check read hosts only through it and ``ViewContext``: only
  ``engine.py`` knows the workers, ``tests/test_structure.py``);
* ``HostHandle``: a host the jobs and views act on (call it, wake its steps);
* ``AgentHandle``: a host's agent called from here, whichever engine polls it;
* ``StepsPort``: what a host's worker runs (``jobs.StepRunner``);
* ``HostContext``: what a host's worker (and its events feed) needs of the engine;
* ``JobContext``: what the jobs need of the engine;
* ``ViewContext``: what the views need of the engine.

``Engine`` and ``poller.HostWorker`` satisfy them structurally; mypy checks it
where the engine passes itself or a worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from vdsm_agent.engine.settings import EngineConfig
from vdsm_agent.engine.states import HostStatus
from vdsm_agent.engine.store import EngineStore
from vdsm_agent.metrics.counters import EngineStats


class HostView(Protocol):
    """What the views show of a host the engine polls (its worker's memory: the
    host's row keeps it only every so often)."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...  # the agent's
    @property
    def status(self) -> HostStatus: ...
    @property
    def current(self) -> bool: ...  # whether what the engine knows of it is current
    @property
    def maintenance(self) -> bool: ...
    @property
    def last_seen(self) -> float | None: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def failures(self) -> int: ...
    @property
    def agent_version(self) -> str | None: ...
    @property
    def synced_at(self) -> float | None: ...
    @property
    def events_supported(self) -> bool | None: ...


class HostHandle(HostView, Protocol):
    """A host the jobs and views act on."""

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        """One call to the host's agent (``AgentUnreachable``, ``AgentError``)."""

    def changed(self) -> None:
        """Something other than a resync wrote what the engine knows of the host."""

    def kick(self) -> None:
        """Run the host's pending steps now."""


class AgentHandle(Protocol):
    """A host's agent called from this engine: its worker, or (several engines) a
    visitor of a host another engine polls (what it knows is what that engine
    wrote in the host's row)."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def current(self) -> bool: ...
    @property
    def agent_version(self) -> str | None: ...

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        """One call to the host's agent (``AgentUnreachable``, ``AgentError``)."""


class StepsPort(Protocol):
    async def run_pending(self, host: HostHandle) -> bool:
        """Try the host's pending steps; True if any is left pending."""


class Changes(Protocol):
    """The store, the clock, and telling the listeners what changed."""

    @property
    def store(self) -> EngineStore: ...

    def now(self) -> float: ...

    def jobs_changed(self, job_ids: Iterable[str]) -> None:
        """Wake ``waitJob`` and the console for these jobs."""

    def notify(self, kind: str, host: str, key: str | None = None) -> None:
        """Tell the listeners that something the views show changed."""


class HostContext(Changes, Protocol):
    """What a host's worker needs of the engine."""

    @property
    def config(self) -> EngineConfig: ...
    @property
    def stats(self) -> EngineStats: ...
    @property
    def steps(self) -> StepsPort: ...


class JobContext(Changes, Protocol):
    """What the jobs and their steps need of the engine."""

    @property
    def stats(self) -> EngineStats: ...

    def host(self, name: str) -> HostHandle | None:
        """The host's worker (None: no such host, or the engine is stopping)."""

    async def reach(self, name: str) -> AgentHandle:
        """What calls the host's agent from here, whichever engine polls it
        (``HostNotFound``: no such host)."""


class ViewContext(Changes, Protocol):
    """What the views need of the engine."""

    @property
    def name(self) -> str: ...  # HOSTNAME:PID (listEngines, a host's polledBy)
    @property
    def engine_id(self) -> str: ...  # new at every start
    @property
    def uptime(self) -> float: ...

    def host(self, name: str) -> HostHandle | None:
        """The host's worker (None: no such host, or the engine is stopping)."""

    def hosts(self) -> Sequence[HostView]:
        """Every host the engine polls (its worker), in no particular order."""

    def seen(self, name: str) -> HostView | None:
        """The host as this engine sees it: its worker, or (several engines) what the
        engine that polls it wrote (None: not known here)."""

    def not_current(self) -> list[str]:
        """Hosts whose state the engine does not currently see (every engine's)."""

    def unreachable(self) -> list[str]:
        """Hosts that should answer and do not (yet) (every engine's)."""
