"""gluster.rebalance: ``gluster volume rebalance VOLUME start``, followed to its end.

Progress, status mapping, cancel and discovery: ``gluster_task``. The task
locks ``gluster-volume:VOLUME`` until it ends, so a second rebalance or a
remove-brick of the volume is ResourceBusy naming this task.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vdsm_agent.system import gluster
from vdsm_agent.tasks.kinds.gluster_task import (
    COUNTS_SCHEMA,
    STATUS_TIMEOUT,
    TASK_ID_SCHEMA,
    VOLUME_SCHEMA,
    GlusterTask,
)


class GlusterRebalance(GlusterTask):
    name = "gluster.rebalance"
    gluster_name = "rebalance"
    description = ("Rebalance a Gluster volume (gluster volume rebalance VOLUME start), "
                   "followed until Gluster reports it completed, failed or stopped; cancel "
                   "stops it. Progress: files scanned; the output and the result have the "
                   "files and bytes moved.")
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["volume"],
        "additionalProperties": False,
        "properties": {"volume": VOLUME_SCHEMA, "glusterTaskID": TASK_ID_SCHEMA},
    }
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["glusterTaskID", "volume", "status", "files", "bytes", "scanned"],
        "properties": COUNTS_SCHEMA,
    }

    def start(self) -> str:
        return gluster.rebalance_start(self.params["volume"])

    def status(self) -> gluster.TaskStatus:
        return gluster.rebalance_status(self.params["volume"], timeout=STATUS_TIMEOUT)

    def stop(self) -> None:
        gluster.rebalance_stop(self.params["volume"])
