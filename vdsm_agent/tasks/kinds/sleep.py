"""test.sleep: a task that waits, for tests of cancel, stale, restart and output.

Registered only when the ``enable_test_kinds`` setting is on; production
agents never offer it.
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

from vdsm_agent.errors import Failure
from vdsm_agent.tasks.kinds.base import KindEnv, TaskFailure, TaskKind, Verification

_FILLER = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-=+*/.,:;!?#%&@$^~|<>\n"


class Sleep(TaskKind):
    name = "test.sleep"
    progress_unit = "milliseconds"
    description = "Test kind: sleeps, prints, fails or crashes on request."
    test_only = True
    checks_filesystem = False  # its checks and resources come from its params alone
    resource_params = {"resources": "test"}  # test:NAME for each name
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "seconds": {"type": "number", "minimum": 0, "maximum": 3600, "default": 1},
            "tick": {"type": "number", "minimum": 0.01, "maximum": 10, "default": 0.05,
                     "description": "Heartbeat and progress granularity."},
            "ignoreTerm": {"type": "boolean", "default": False,
                           "description": "Never stop on a cancel (SIGTERM): needs SIGKILL."},
            "printEvery": {"type": "number", "minimum": 0, "default": 0.5,
                           "description": "Seconds between 'slept' lines; 0: none."},
            "outputBytes": {"type": "integer", "minimum": 0, "maximum": 268435456,
                            "default": 0, "description": "Filler output written first."},
            "resources": {"type": "array", "maxItems": 8, "uniqueItems": True,
                          "items": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"}},
            "fail": {"type": "string", "maxLength": 200,
                     "description": "Fail at the end with this message."},
            "crash": {"type": "boolean", "default": False,
                      "description": "Exit at the end without recording an outcome."},
            "warnings": {"type": "array", "maxItems": 8,
                         "items": {"type": "string", "maxLength": 200}},
            "verifiable": {"type": "boolean", "default": False,
                           "description": "verify() reports the work complete."},
        },
    }
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["slept"],
        "properties": {"slept": {"type": "number"}, "verified": {"type": "boolean"}},
    }

    @classmethod
    def resources(cls, params: dict[str, Any], env: KindEnv) -> list[str]:
        return sorted(f"test:{name}" for name in params.get("resources", ()))

    @classmethod
    def verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        if params.get("verifiable"):
            return Verification(True, "test kind: verifiable",
                                {"slept": params["seconds"], "verified": True})
        return Verification(False, "test kind: not verifiable")

    def perform(self) -> dict[str, Any]:
        self._filler(self.params["outputBytes"])
        seconds = float(self.params["seconds"])
        tick = float(self.params["tick"])
        every = float(self.params["printEvery"])
        started = time.monotonic()
        last_print = started
        total_ms = int(seconds * 1000)
        while (elapsed := time.monotonic() - started) < seconds:
            if not self.params["ignoreTerm"]:
                self.ctx.check_cancel()
            time.sleep(min(tick, seconds - elapsed))
            now = time.monotonic()
            self.ctx.progress(min(int((now - started) * 1000), total_ms), total_ms)
            if every and now - last_print >= every:
                last_print = now
                self.ctx.print(f"slept {now - started:.1f}s of {seconds:g}s")
        return self._finish(seconds)

    def _filler(self, count: int) -> None:
        while count > 0:
            chunk = _FILLER * (min(count, 1 << 20) // len(_FILLER) + 1)
            piece = chunk[:min(count, 1 << 20)]
            self.ctx.write(piece)
            count -= len(piece)

    def _finish(self, seconds: float) -> dict[str, Any]:
        for warning in self.params.get("warnings", ()):
            self.ctx.warn(warning)
        if self.params["crash"]:
            os._exit(17)  # no outcome: the agent must call this interrupted
        if "fail" in self.params:
            raise TaskFailure(Failure.TEST_FAILURE, self.params["fail"])
        return {"slept": seconds}
