"""The engine's settings table (section ``[engine]``), on the agent's machinery.

Precedence: built-in default < config file (``--config``, section
``[engine]``) < command line. The table in docs/engine.md is generated from
``SETTINGS`` (``python -m vdsm_agent.engine.settings``), and so are the typed
attributes of ``EngineConfig`` (``vdsm_agent/engine/settings_fields.py``,
``python -m vdsm_agent.engine.settings --fields``); a test fails when either
is stale.
"""

from __future__ import annotations

import dataclasses
import sys
import urllib.parse
from pathlib import Path
from typing import ClassVar

from vdsm_agent.common.settings import (
    LOG_LEVELS,
    BaseConfig,
    Setting,
    SettingsTable,
    parse_bool,
    parse_host_port,
    parse_log_level,
    parse_path,
    parse_positive_int,
    parse_seconds,
)
from vdsm_agent.engine.settings_fields import EngineFields
from vdsm_agent.settings import BY_NAME as AGENT_SETTINGS

SECTION = "engine"
DEFAULT_PORT = 54322
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres")


def parse_database_url(text: str) -> str:
    """``sqlite:////abs/path.db``, ``postgresql://user:pass@host:port/db`` or empty."""
    url = text.strip()
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in DATABASE_SCHEMES:
        raise ValueError(f"the scheme must be one of {', '.join(DATABASE_SCHEMES)}")
    if not parts.path.strip("/"):
        raise ValueError("no database name (sqlite:////abs/file.db, postgresql://.../name)")
    if parts.scheme != "sqlite" and not parts.hostname:
        raise ValueError("no host (postgresql://user:password@host:port/name)")
    return url


def parse_events_timeout(text: str) -> float:
    number = parse_seconds(text)
    if number > 60:
        raise ValueError(f"must be at most 60 seconds (the agent's limit), got {number}")
    return number


def _agents(name: str, help: str = "", default: object = None) -> Setting:
    """The agent's row ``name`` (its parser, its flag), with the engine's words and
    default where they differ: the engine is secured by the agent's own code
    (security/, server/listeners.py), so it takes the same settings."""
    row = AGENT_SETTINGS[name]
    return dataclasses.replace(row, help=help or row.help,
                               default=row.default if default is None else default)


SETTINGS: tuple[Setting, ...] = (
    Setting("state_dir", "path", "./vdsm-engine-state",
            "Directory for the engine's state: its sqlite database unless --database "
            "says otherwise (created if missing).", parse_path),
    Setting("listen", "HOST:PORT", f"127.0.0.1:{DEFAULT_PORT}",
            "TCP address for the engine's own HTTP API. Plain HTTP is refused on any "
            "non-loopback address; its callers are anonymous (loopback_role).",
            parse_host_port),
    _agents("unix_socket", "Unix socket for HTTP (mode 0660): its callers are known by "
            "SO_PEERCRED (root and the engine's own user are admin). Empty: none.",
            default=""),
    Setting("database", "URL", "",
            "Database URL: sqlite:////abs/path/engine.db or "
            "postgresql://user:password@host:port/name. Empty: sqlite in STATE_DIR "
            "(engine.db).", parse_database_url),
    Setting("log_level", "choice", "info",
            "Log level: " + ", ".join(LOG_LEVELS) + ".", parse_log_level),
    Setting("access_log", "boolean", False, "Log every HTTP request of the engine's API.",
            parse_bool),
    Setting("max_body_size", "integer", 1024 * 1024,
            "Largest accepted HTTP request body, in bytes.", parse_positive_int),
    Setting("max_batch", "integer", 100,
            "Largest accepted JSON-RPC batch (number of members).", parse_positive_int),
    # -- security and limits (the agent's: vdsm_agent/security, docs/security.md) --
    _agents("tls_listen"),
    _agents("tls_cert"),
    _agents("tls_key"),
    _agents("tls_ca"),
    _agents("roles"),
    _agents("default_role", "Role of a caller that [roles] does not list: a certificate "
            "from the CA, a local user other than root and the engine's own user on the "
            "Unix socket. none: every call is Forbidden."),
    _agents("loopback_role"),
    _agents("loopback_metrics"),
    _agents("audit_log", "File that also receives the audit log of the engine's mutating "
            "calls and refusals (one JSON object per line; reopened after logrotate moves "
            "it). Empty: the audit lines go to the engine's log only (logger "
            "vdsm_agent.audit)."),
    _agents("max_concurrent_requests"),
    _agents("max_requests_per_connection"),
    _agents("max_long_polls", "Long-polls (waitJob) and streams (GET "
            "/hosts/H/tasks/T/output) served at once, whoever calls; each also holds one "
            "of max_concurrent_requests. Beyond it they answer LimitExceeded at once."),
    _agents("reserved_requests"),
    _agents("max_connections", "Open connections on each TCP listener (plain and TLS); "
            "a connection beyond it is closed at once, unread."),
    _agents("unix_max_connections", "Open connections on the Unix socket (its own cap "
            "and descriptors, apart from TCP); the last 8 are kept for root and the "
            "engine's own user."),
    _agents("header_timeout"),
    _agents("keepalive_timeout"),
    # -- talking to agents (vdsm_agent/engine/agentclient.py, poller.py) --
    Setting("connect_timeout", "seconds", 5.0,
            "Timeout for opening a connection to an agent.", parse_seconds),
    Setting("request_timeout", "seconds", 10.0,
            "Timeout for one short call to an agent (everything but the events long-poll, "
            "which gets events_timeout more).", parse_seconds),
    Setting("events_timeout", "seconds", 60.0,
            "The long-poll timeout passed to an agent's getEvents (at most 60, the "
            "agent's default events_max_wait; an agent that allows less is asked for "
            "its maximum). Every poll that ends with no event is a request for nothing.",
            parse_events_timeout),
    Setting("resync_interval", "seconds", 60.0,
            "Full resynchronisation of every host (listTasks, getStorageConnectionList) "
            "this often, besides after every gap in its events feed.", parse_seconds),
    Setting("poll_interval", "seconds", 5.0,
            "For an agent without an events feed: resynchronise this often instead.",
            parse_seconds),
    Setting("unresponsive_after", "integer", 3,
            "Failed attempts in a row (calls that time out or cannot connect) that make a "
            "host non-responsive; it is up again as soon as a call succeeds.",
            parse_positive_int),
    Setting("retry_interval", "seconds", 2.0,
            "Shortest delay before retrying a host after a failed attempt: after n "
            "failures in a row the delay is uniform(0, retry_interval * 2^(n-1)), at "
            "least retry_interval and at most retry_max (full jitter, so that hosts "
            "lost together are not retried in lock-step).", parse_seconds),
    Setting("retry_max", "seconds", 30.0,
            "Longest delay between attempts to reach a failing host.", parse_seconds),
    # -- jobs (vdsm_agent/engine/jobs.py) --
    Setting("job_retention", "seconds", 86400.0,
            "Finished jobs (and their steps) are deleted this long after they end.",
            parse_seconds),
    # -- several engines on one PostgreSQL (vdsm_agent/engine/leases.py) --
    Setting("lease_time", "seconds", 10.0,
            "PostgreSQL: how long an engine's lease of a host lasts unless renewed (every "
            "lease_time/3): the bound on taking over the hosts of an engine that died. "
            "Ignored on sqlite (one engine polls every host).", parse_seconds),
)

ENGINE = SettingsTable(SETTINGS, SECTION)


class EngineConfig(EngineFields, BaseConfig):
    """The engine's resolved settings: one typed attribute per setting."""

    table: ClassVar[SettingsTable] = ENGINE

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def unix_socket_path(self) -> Path | None:
        """The Unix socket, when one is configured (the engine has none by default)."""
        configured = self.unix_socket
        return Path(configured) if configured and configured.lower() != "none" else None

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.state_path / 'engine.db'}"


def defaults() -> EngineConfig:
    return EngineConfig.defaults()


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def render_docs_table() -> str:
    """The settings table of docs/engine.md (between its generated-table markers)."""
    return "\n".join(ENGINE.docs_table()) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--fields"]:
        ENGINE.write_fields("EngineFields", "vdsm_agent.engine.settings",
                            Path(__file__).with_name("settings_fields.py"))
    else:
        print(render_docs_table(), end="")
