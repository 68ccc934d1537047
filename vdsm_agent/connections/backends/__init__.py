"""The connection backends, one per URI scheme, in one table.

``BACKENDS`` maps a scheme to its backend class; its keys are the schemes the
agent supports (``getCapabilities.uriSchemes``; any other is
``UnsupportedScheme``). A scheme registered twice fails at import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vdsm_agent.connections.backends.base import Backend
from vdsm_agent.connections.backends.file import FileBackend
from vdsm_agent.connections.backends.glusterfs import GlusterfsBackend
from vdsm_agent.connections.backends.iscsi import IscsiBackend
from vdsm_agent.connections.backends.loop import LoopBackend
from vdsm_agent.connections.backends.nfs import NfsBackend
from vdsm_agent.connections.backends.sshfs import SshfsBackend

BackendClass = type[Backend[Any]]


def by_scheme(classes: Iterable[BackendClass]) -> dict[str, BackendClass]:
    """The table; ValueError when two backends claim one scheme."""
    table: dict[str, BackendClass] = {}
    for cls in classes:
        if cls.scheme in table:
            raise ValueError(f"URI scheme {cls.scheme!r} registered twice: "
                             f"{table[cls.scheme].__name__} and {cls.__name__}")
        table[cls.scheme] = cls
    return table


BACKENDS: dict[str, BackendClass] = by_scheme([
    NfsBackend, IscsiBackend, GlusterfsBackend, SshfsBackend, FileBackend, LoopBackend,
])
