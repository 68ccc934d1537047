"""Roles, and the policy that gives each caller one.

Roles are ordered: ``none < read < operate < admin``; a role allows every call
that needs it or less. Which role a verb needs is written in
``rpc_schema/agent.json`` (``"role"`` per method); this module only says who
has which role:

* the ``[roles]`` section of the config file (``identity = role``; also the
  repeatable ``--role IDENTITY=ROLE`` flag) is looked up first. Identities are
  compared case-insensitively;
* a certificate's names are its subject CN, then its subjectAltNames (DNS,
  URI, email) in certificate order; the first name listed in ``[roles]``
  decides. Names starting with ``uid:`` or ``user:`` are never looked up for a
  certificate, so no certificate can pass for a local user;
* a Unix socket caller is ``uid:N`` (``SO_PEERCRED``), also looked up as
  ``user:NAME``; when neither is listed, root and the agent's own user are
  ``admin`` (they could do anything the agent does anyway) and everyone else
  gets ``default_role``;
* a loopback TCP caller is anonymous (nothing attests who it is): it gets
  ``loopback_role`` when that is set (an explicit grant to every process on
  the host), else ``default_role``;
* anyone else: ``default_role`` (built-in default ``none``: refuse).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Iterable, Mapping, Sequence

RESERVED_PREFIXES = ("uid:", "user:")


class Role(enum.IntEnum):
    NONE = 0
    READ = 1
    OPERATE = 2
    ADMIN = 3

    def __str__(self) -> str:
        return self.name.lower()


ROLE_NAMES = tuple(str(role) for role in Role)
_BY_NAME = {str(role): role for role in Role}


def parse_role(text: str) -> Role:
    """A role by name; ValueError naming the choices otherwise."""
    role = _BY_NAME.get(text.strip().lower())
    if role is None:
        raise ValueError(f"not a role: {text.strip()!r} (one of {', '.join(ROLE_NAMES)})")
    return role


def normalize(identity: str) -> str:
    return identity.strip().casefold()


@dataclasses.dataclass(frozen=True)
class RolePolicy:
    """Maps identities to roles (see the module docstring for the rules)."""

    table: Mapping[str, Role]  # normalized identity -> role
    default: Role = Role.NONE
    loopback: Role | None = None
    agent_uid: int = dataclasses.field(default_factory=os.geteuid)

    @classmethod
    def build(cls, entries: Iterable[tuple[str, str]], default_role: str,
              loopback_role: str = "", agent_uid: int | None = None) -> RolePolicy:
        table: dict[str, Role] = {}
        for identity, role in entries:
            table[normalize(identity)] = parse_role(role)
        return cls(table=table, default=parse_role(default_role),
                   loopback=parse_role(loopback_role) if loopback_role.strip() else None,
                   agent_uid=os.geteuid() if agent_uid is None else agent_uid)

    def for_certificate(self, names: Sequence[str]) -> Role:
        for name in names:
            key = normalize(name)
            if key.startswith(RESERVED_PREFIXES):
                continue
            role = self.table.get(key)
            if role is not None:
                return role
        return self.default

    def for_uid(self, uid: int, user: str | None) -> Role:
        role = self.table.get(f"uid:{uid}")
        if role is None and user is not None:
            role = self.table.get(normalize(f"user:{user}"))
        if role is not None:
            return role
        if uid in (0, self.agent_uid):
            return Role.ADMIN
        return self.default
