"""The shared shape of the kinds that work on one block device (wipe, format, fsck)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vdsm_agent import errors
from vdsm_agent.tasks.kinds import notes, paths, safety
from vdsm_agent.tasks.kinds.base import KindEnv, TaskFailure, TaskKind, Verification

VerifyFn = Callable[[dict[str, Any], KindEnv], Verification]


def guarded_verify(verify: VerifyFn, params: dict[str, Any], env: KindEnv) -> Verification:
    """A kind's verification; failing to look at the target is "cannot verify"."""
    try:
        return verify(params, env)
    except (errors.RpcError, TaskFailure, OSError) as exc:
        return notes.cannot_verify(exc)


class DeviceKind(TaskKind):
    """A kind whose params name one block device in ``device``.

    At submit, ``validate`` runs the kind's ``_check`` (safety and param checks);
    in the task's child only the path is resolved, because ``pre()`` repeats
    every check right before the work. The device is the one resource locked.
    """

    @classmethod
    def _target(cls, params: dict[str, Any]) -> paths.Target:
        return safety.resolve_device(params["device"], "params.params.device")

    @classmethod
    def _check(cls, params: dict[str, Any]) -> object:
        raise NotImplementedError

    @classmethod
    def _verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        raise NotImplementedError

    @classmethod
    def validate(cls, params: dict[str, Any], env: KindEnv) -> None:
        if safety.in_child(env):
            cls._target(params)
            return
        cls._check(params)

    @classmethod
    def resources(cls, params: dict[str, Any], env: KindEnv) -> list[str]:
        return [cls._target(params).resource]

    @classmethod
    def verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        return guarded_verify(cls._verify, params, env)
