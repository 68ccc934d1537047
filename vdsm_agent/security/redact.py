"""Keep secrets out of logs, task records, events and errors.

What counts as a secret:

* the password of a URI's userinfo (``scheme://user:PASSWORD@host/...``);
* the value of a URI query parameter, or of a params member (at any depth),
  whose name says it is one: password, passwd, passphrase, secret,
  credential(s), private key, API key, key data/content/material,
  authorization, or a name ending in token (but not ``pageToken``), compared
  without case, ``-``, ``_`` or ``.`` (``chapPassword``, ``key_data``,
  ``node.session.auth.password``);
* any string holding a PEM private key (``-----BEGIN ... PRIVATE KEY-----``).

Paths to key files (``sshfs_identity_file``, ``identityFile``) are not secret
and are kept: only key *contents* are. Every function here is total: it never
raises on malformed input (a URI that does not parse is still redacted as far
as its shape allows; a structure nested deeper than ``MAX_DEPTH`` is masked
below that depth) and never changes its argument.
"""

from __future__ import annotations

import functools
import re
from typing import Any

MASK = "***"

_SECRET_FRAGMENTS = (
    "password", "passwd", "passphrase", "secret", "credential", "privatekey",
    "apikey", "keydata", "keycontent", "keymaterial", "authorization",
)
_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@functools.lru_cache(maxsize=4096)  # few distinct names; every audited call asks
def is_secret_name(name: str) -> bool:
    flat = name.lower().replace("_", "").replace("-", "").replace(".", "")
    if flat.endswith("token"):
        return not flat.endswith("pagetoken")  # a pagination cursor is not a secret
    return any(fragment in flat for fragment in _SECRET_FRAGMENTS)


def uri(text: str) -> str:
    """``text`` with a userinfo password and secret query values masked."""
    match = _SCHEME.match(text)
    if match is None:
        return MASK if _PEM_PRIVATE.search(text) else text
    start = match.end()
    rest = text[start:]
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hostport = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = userinfo.split(":", 1)[0] + ":" + MASK + "@" + hostport
    return text[:start] + authority + _query(tail)


def _query(tail: str) -> str:
    path, mark, query = tail.partition("?")
    if not mark:
        return tail
    query, hash_mark, fragment = query.partition("#")
    pairs = []
    for pair in query.split("&"):
        name, equals, _value = pair.partition("=")
        pairs.append(f"{name}={MASK}" if equals and is_secret_name(name) else pair)
    return path + "?" + "&".join(pairs) + hash_mark + fragment


# Containers nested deeper than this are masked whole rather than walked: the
# walk recurses, and Python's recursion limit must never be what stops it
# (params nest at most rpc_schema.MAX_PARAMS_DEPTH = 32 deep; nothing the agent
# keeps is deeper).
MAX_DEPTH = 64


def value(item: Any, _depth: int = 0) -> Any:
    """A copy of ``item`` (params, a record, an event) with secrets masked
    (containers deeper than ``MAX_DEPTH`` become ``MASK``)."""
    if isinstance(item, str):
        return _string(item)
    if not isinstance(item, dict | list | tuple):
        return item
    if _depth >= MAX_DEPTH:
        return MASK
    depth = _depth + 1
    if isinstance(item, dict):
        return {key: (MASK if isinstance(key, str) and is_secret_name(key) and item_ is not None
                      else value(item_, depth))
                for key, item_ in item.items()}
    if isinstance(item, list):
        return [value(element, depth) for element in item]
    return tuple(value(element, depth) for element in item)


def _string(text: str) -> str:
    if "://" in text or "-----BEGIN" in text:
        if _PEM_PRIVATE.search(text):
            return MASK
        if _SCHEME.match(text):
            return uri(text)
    return text


def text(message: str, limit: int = 0) -> str:
    """A free-text message with URIs in it redacted, optionally cut to ``limit`` characters."""
    if "://" in message:
        message = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: uri(m.group(0)), message)
    if _PEM_PRIVATE.search(message):
        message = MASK
    if limit and len(message) > limit:
        message = message[:limit] + "..."
    return message
