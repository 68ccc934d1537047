"""Change tokens of the list verbs (``listTasks``, ``getStorageConnectionList``).

A caller that lists a host again and again (the engine's resynchronisation)
passes back the ``changeToken`` of its last answer as ``changedSince``; when
nothing the list shows has changed since, the answer is "not modified" and
costs neither a store read nor the bytes of the list.

A token is ``EPOCH.VERSION``: the epoch is random per agent process (and per
list), so a token from an earlier run of the agent, or from another agent,
never matches and always gets the full answer. A token that does not match
for any reason (unknown, garbled, older) gets the full answer too: "not
modified" is only ever said for a token this process made for a list that
has not changed since. The version is a counter bumped after every change
(``ChangeCounter``) or a digest of what the list shows (``digest_token``).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import orjson


def new_epoch() -> str:
    return uuid.uuid4().hex[:12]  # 48 random bits: no two runs of an agent share one


class ChangeCounter:
    """A list's version: ``bump()`` after each change is visible to a reader of the list.

    A reader takes ``token()`` *before* it reads the list: a change committed
    after that bumps the counter, so the token it hands out is at worst older
    than what it read (the next call gets a full answer again), never newer."""

    def __init__(self) -> None:
        self.epoch = new_epoch()
        self.version = 0

    def bump(self) -> None:
        self.version += 1

    def token(self) -> str:
        return f"{self.epoch}.{self.version}"


def digest_token(epoch: str, value: Any) -> str:
    """A token that names ``value`` itself (any JSON value): equal values, equal tokens."""
    digest = hashlib.blake2b(orjson.dumps(value, option=orjson.OPT_SORT_KEYS),
                             digest_size=8).hexdigest()
    return f"{epoch}.{digest}"


def not_modified(changed_since: str | None, current: str) -> bool:
    """Whether a caller holding ``changed_since`` may be told "not modified"."""
    return bool(changed_since) and changed_since == current
