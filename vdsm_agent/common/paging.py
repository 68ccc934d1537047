"""Page tokens of the list verbs (``listTasks``; the engine's ``listTasks``, ``listJobs``).

A list is read in keyset order; a page's ``nextPageToken`` carries the sort
key of its last item and a fingerprint of the filter that made it, so that
the next page starts right after that item and a token is refused (as
``InvalidParams``, field ``params.pageToken``) with another filter. The token
is opaque to callers: URL-safe base64 of ``{"k": KEY, "f": FINGERPRINT}``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import orjson

from vdsm_agent import errors


def fingerprint(query: Any) -> str:
    """A short digest of a list's filter (any JSON value; key order does not matter)."""
    return hashlib.sha256(orjson.dumps(query, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def encode_token(key: list[Any], query_fingerprint: str) -> str:
    raw = orjson.dumps({"k": key, "f": query_fingerprint})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, query_fingerprint: str, verb: str,
                 types: tuple[Callable[[Any], Any], ...]) -> tuple[Any, ...]:
    """The sort key in a token that ``verb`` made with this filter, each value
    converted by its entry of ``types``; ``InvalidParams`` for anything else."""
    bad = errors.InvalidParams(f"pageToken is not a token from {verb} with this filter",
                               field="params.pageToken", rule="pageToken")
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        key, owner = payload["k"], payload["f"]
        if owner != query_fingerprint or not isinstance(key, list) or len(key) != len(types):
            raise bad
        return tuple(convert(value) for convert, value in zip(types, key, strict=True))
    except (ValueError, TypeError, KeyError):
        raise bad from None
