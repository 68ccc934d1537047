"""Task kinds: the one table of registered kinds, keyed by kind name.

To add a kind, write one module here with a ``TaskKind`` subclass and list it
in ``KINDS``. Kinds marked ``test_only`` are offered only when the
``enable_test_kinds`` setting is on.
"""

from __future__ import annotations

from vdsm_agent.tasks.kinds.base import KindEnv, TaskKind
from vdsm_agent.tasks.kinds.checksum import Checksum
from vdsm_agent.tasks.kinds.copy import Copy
from vdsm_agent.tasks.kinds.format import Format
from vdsm_agent.tasks.kinds.fsck import Fsck
from vdsm_agent.tasks.kinds.gluster_rebalance import GlusterRebalance
from vdsm_agent.tasks.kinds.gluster_remove_brick import GlusterRemoveBrick, GlusterRemoveBrickCommit
from vdsm_agent.tasks.kinds.sleep import Sleep
from vdsm_agent.tasks.kinds.wipe import Wipe

KINDS: dict[str, type[TaskKind]] = {
    kind.name: kind for kind in (Checksum, Copy, Format, Fsck, Sleep, Wipe,
                                 GlusterRebalance, GlusterRemoveBrick,
                                 GlusterRemoveBrickCommit)}


def enabled(enable_test_kinds: bool) -> dict[str, type[TaskKind]]:
    """The kinds this agent offers."""
    return {name: kind for name, kind in KINDS.items()
            if enable_test_kinds or not kind.test_only}


__all__ = ["KINDS", "KindEnv", "TaskKind", "enabled"]
