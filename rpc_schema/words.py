"""Schema violations in words: what a ``pattern`` or a ``format`` expects, with an example.

fastjsonschema says ``params.path must match pattern ^/``, which is true and
useless to a person. Every pattern and format the schemas use (agent.json,
engine.json and the task kinds' params) has one entry here, so the answer
says ``params.params.path must be an absolute path (starting with /), e.g.
/srv/images/disk1.img`` instead. One table rather than a message per field:
the same pattern means the same thing wherever it appears, and
tests/test_messages.py fails when a schema gains a pattern without words.
A pattern missing here still gets fastjsonschema's sentence.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

UUID = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

PATTERNS: dict[str, str] = {
    "^/": "must be an absolute path (starting with /), e.g. /srv/images/disk1.img",
    UUID: "must be a UUID (8-4-4-4-12 hexadecimal digits), "
          "e.g. 0b6f3c1e-6a3c-4f5e-9d61-1f1c2a3b4c5d",
    "^[^/]+$": "must not contain '/' (any other characters are fine), e.g. sd-data-1",
    "^[A-Za-z0-9._-]+$": "may hold only letters, digits, '.', '_' and '-', e.g. host1",
    "^[a-z][a-zA-Z0-9._-]*$": "must be a task kind's name (a lower-case letter, then "
                              "letters, digits, '.', '_' or '-'), e.g. checksum or "
                              "gluster.removeBrick",
    "^/dev/[A-Za-z0-9._/:+-]+$": "must be a device path under /dev, e.g. /dev/loop1",
    "^[a-z][a-z0-9-]*$": "must be a resource class (a lower-case letter, then lower-case "
                         "letters, digits or '-'), e.g. gluster-volume",
    "^https?://(\\[[0-9A-Fa-f:.]+\\]|[A-Za-z0-9.-]+):[0-9]{1,5}((/[A-Za-z0-9._~-]+)*/jsonrpc)?$":
        "must be an agent URL http(s)://HOST:PORT[[/PREFIX]/jsonrpc] with its port, "
        "e.g. http://host1.example.com:54321",
    "^[A-Za-z0-9_.][A-Za-z0-9 _.+-]*$": "may hold letters, digits, spaces and '_', '.', "
                                         "'+', '-' (not a space, '+' or '-' first), "
                                         "e.g. data-1",
    "^[A-Za-z0-9._:-]{1,64}$": "must be 1-64 letters, digits, '.', '_', ':' or '-', "
                               "e.g. disk:a",
    # Gluster volumes and bricks (vdsm_agent/system/gluster.py)
    "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$": "must be a Gluster volume name: 1-64 letters, "
                                        "digits, '_' or '-' (a letter or digit first), "
                                        "e.g. data-vol1",
    "^[A-Za-z0-9][A-Za-z0-9.-]{0,252}:/[A-Za-z0-9._+@%=,/-]{1,4000}$":
        "must be a brick HOST:/PATH (a host name or address, an absolute path), "
        "e.g. host1:/bricks/b1",
}

FORMATS: dict[str, str] = {
    "date-time": "must be an RFC 3339 date and time, e.g. 2025-03-01T12:00:00Z",
}


def explain(rule: str, definition: Any) -> str | None:
    """The words for a failed ``pattern`` or ``format`` rule, or None."""
    if rule == "pattern":
        return PATTERNS.get(str(definition))
    if rule == "format":
        return FORMATS.get(str(definition))
    return None


def rules_in(schema: Any) -> Iterator[tuple[str, str]]:
    """Every ("pattern", regex) and ("format", name) a schema uses, at any depth."""
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for rule in ("pattern", "format"):
                if isinstance(item.get(rule), str):
                    yield rule, item[rule]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
