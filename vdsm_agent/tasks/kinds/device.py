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

    At submit, ``validate`` resolves the device to a descriptor, runs the
    kind's ``_check`` on it (safety and param checks) and closes it; in the
    task's process ``pre()`` resolves it again, repeats every check right
    before the work and keeps the descriptor until the end. The device is the
    one resource locked.
    """

    FIELD = "params.params.device"
    resource_params = {"device": "device"}  # resolved under /dev

    @classmethod
    def _resolve(cls, params: dict[str, Any]) -> paths.Target:
        """The device's descriptor (the caller closes it)."""
        return paths.resolve_device(params["device"], cls.FIELD)

    @classmethod
    def _check_params(cls, params: dict[str, Any]) -> None:
        """Checks of the params alone, before the device is looked at (optional)."""
        return None

    @classmethod
    def _check(cls, params: dict[str, Any], target: paths.Target) -> dict[str, Any]:
        """The kind's checks of the device (raise ``errors.*``); its inventory facts."""
        raise NotImplementedError

    @classmethod
    def _verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        raise NotImplementedError

    @classmethod
    def validate(cls, params: dict[str, Any], env: KindEnv) -> None:
        cls._check_params(params)
        if safety.in_child(env):
            return  # pre() resolves the device and repeats every check
        with cls._resolve(params) as target:
            cls._check(params, target)

    @classmethod
    def resources(cls, params: dict[str, Any], env: KindEnv) -> list[str]:
        with cls._resolve(params) as target:
            return [paths.resource(target)]

    @classmethod
    def verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        return guarded_verify(cls._verify, params, env)
