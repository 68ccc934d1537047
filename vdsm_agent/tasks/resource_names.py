"""How a task kind's params name the resources its tasks lock: one rule for agent and engine.

Each kind declares it (``TaskKind.resource_params``, published by getTaskKinds
as ``resourceParams``): a mapping from a param to the class of what it names.
A string param names one resource, an array param one per string item; the
name is the class, a colon and the value:

* ``path``: a path the agent resolves (an image file beneath an allowed root,
  or a block device under /dev): ``device:PATH`` under ``/dev/``, else
  ``file:PATH``; a value that is not absolute names nothing (the agent refuses
  it);
* any other class ``C`` (``device``, ``gluster-volume``, ``test``):
  ``C:VALUE``.

The engine computes a task's locks from its host's table before it calls the
host, so that a conflicting start is refused at once; the agent's own
``resources()`` then says what the task holds (``tests/test_resource_params.py``
checks that both agree for every kind). Names are as spelled in the params:
the agent names a path as it resolves it (beneath a root's resolved name), so
a path spelled through a symlinked root is locked by the engine under its
spelling until the host reports the task's resources.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PATH = "path"  # file: or device:, by where the path is


def name(resource_class: str, value: str) -> str | None:
    """The resource a param's string value names (None: none)."""
    if resource_class == PATH:
        if not value.startswith("/"):
            return None
        return f"{'device' if value.startswith('/dev/') else 'file'}:{value}"
    return f"{resource_class}:{value}" if value else None


def declared(declaration: Mapping[str, str], params: Mapping[str, Any]) -> list[str]:
    """What a task with these params locks, by its kind's declaration (sorted, once each)."""
    found: set[str] = set()
    for param, resource_class in declaration.items():
        value = params.get(param)
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, str) and (named := name(resource_class, item)) is not None:
                found.add(named)
    return sorted(found)
