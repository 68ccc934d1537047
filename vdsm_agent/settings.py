"""The agent's settings: one table drives the INI file, the flags, the docs and the types.

Precedence: built-in default < config file (section ``[agent]``) < command line.
``docs/configuration.md`` is generated from ``SETTINGS`` (``python -m
vdsm_agent.settings``) and so are the typed attributes of ``Config``
(``vdsm_agent/settings_fields.py``, ``python -m vdsm_agent.settings --fields``);
a test fails when either is stale. The machinery (``Setting``,
``SettingsTable``, ``BaseConfig``, the shared parsers) is
``vdsm_agent.common.settings``, which the engine's table uses too.
"""

# Longer than 400 lines: the settings table is one table (a row per setting with its
# help text); the INI file, the flags, the docs and the typed fields are made from it.

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from vdsm_agent.common.settings import (
    LOG_LEVELS,
    BaseConfig,
    Setting,
    SettingsError,
    SettingsTable,
    format_default,
    parse_bool,
    parse_host_port,
    parse_log_level,
    parse_non_negative_int,
    parse_path,
    parse_positive_int,
    parse_seconds,
)
from vdsm_agent.security import roles
from vdsm_agent.settings_fields import AgentFields

__all__ = [  # with what common.settings gives every table (callers find it here)
    "AGENT", "BY_NAME", "IONICE_CLASSES", "LOG_LEVELS", "SECTION", "SETTINGS",
    "SSH_HOST_KEY_POLICIES", "WAIT_TASK_DEFAULT", "BaseConfig", "Config", "Setting",
    "SettingsError", "SettingsTable", "add_flags", "defaults", "format_default", "parse_bool",
    "parse_host_key_policy", "parse_host_port", "parse_ionice_class", "parse_log_level",
    "parse_nice", "parse_non_negative_int", "parse_optional_host_port",
    "parse_optional_role_name", "parse_output_cap", "parse_path", "parse_positive_int",
    "parse_role_entry", "parse_role_name", "parse_seconds", "parse_task_max_wait",
    "read_config_file", "render_docs", "resolve",
]

SECTION = "agent"


def parse_output_cap(text: str) -> int:
    number = int(text)
    if number < 4096:
        raise ValueError(f"must be at least 4096 bytes, got {number}")
    return number


WAIT_TASK_DEFAULT = 30.0  # waitTask's default timeout (rpc_schema/agent.json)
WAIT_TASK_MAXIMUM = 3600.0  # waitTask's timeout "maximum" in rpc_schema/agent.json


def parse_task_max_wait(text: str) -> float:
    number = parse_seconds(text)
    if not WAIT_TASK_DEFAULT <= number <= WAIT_TASK_MAXIMUM:
        raise ValueError(f"must be between {WAIT_TASK_DEFAULT:g} seconds (waitTask's default "
                         f"timeout) and {WAIT_TASK_MAXIMUM:g} (its schema's maximum), "
                         f"got {number:g}")
    return number


def parse_optional_host_port(text: str) -> tuple[str, int] | None:
    return parse_host_port(text) if text.strip() else None


def parse_role_name(text: str) -> str:
    return str(roles.parse_role(text))


def parse_optional_role_name(text: str) -> str:
    return parse_role_name(text) if text.strip() else ""


def parse_role_entry(text: str) -> tuple[str, str]:
    """``IDENTITY=ROLE`` (the flag) or ``IDENTITY = ROLE`` (a line of [roles])."""
    identity, sep, role = text.rpartition("=")
    if not sep or not identity.strip():
        raise ValueError(f"expected IDENTITY=ROLE, got {text.strip()!r}")
    return identity.strip(), parse_role_name(role)


SSH_HOST_KEY_POLICIES = ("yes", "accept-new", "no")


def parse_host_key_policy(text: str) -> str:
    policy = text.strip()
    if policy not in SSH_HOST_KEY_POLICIES:
        raise ValueError(f"must be one of {', '.join(SSH_HOST_KEY_POLICIES)}")
    return policy


IONICE_CLASSES = ("idle", "best-effort", "none")  # as vdsm_agent.tasks.kinds.priority


def parse_non_negative_seconds(text: str) -> float:
    number = float(text)
    if number < 0:
        raise ValueError(f"must be 0 or a positive number of seconds, got {number}")
    return number


def parse_nice(text: str) -> int:
    number = int(text)
    if not 0 <= number <= 19:
        raise ValueError(f"must be between 0 and 19, got {number}")
    return number


def parse_ionice_class(text: str) -> str:
    name = text.strip().lower()
    if name not in IONICE_CLASSES:
        raise ValueError(f"must be one of {', '.join(IONICE_CLASSES)}")
    return name


SETTINGS: tuple[Setting, ...] = (
    Setting("state_dir", "path", "./vdsm-agent-state",
            "Directory for the sqlite store and other state (created if missing).",
            parse_path),
    Setting("listen", "HOST:PORT", "127.0.0.1:54321",
            "TCP address for HTTP. Plain HTTP is refused on any non-loopback address.",
            parse_host_port),
    Setting("unix_socket", "path", "",
            "Unix socket for HTTP (mode 0660). Empty: STATE_DIR/agent.sock. "
            "'none' disables it.",
            parse_path),
    Setting("log_level", "choice", "info",
            "Log level: " + ", ".join(LOG_LEVELS) + ".", parse_log_level),
    Setting("access_log", "boolean", False,
            "Log every HTTP request (off by default: it costs ~20% of throughput).",
            parse_bool),
    Setting("allowed_roots", "path list", (),
            "Directories under which image files may be read or written by tasks "
            "(repeat the flag; one per line in the file).",
            parse_path, flag="--allowed-root", repeatable=True),
    Setting("max_body_size", "integer", 1024 * 1024,
            "Largest accepted HTTP request body, in bytes.", parse_positive_int),
    Setting("max_batch", "integer", 100,
            "Largest accepted JSON-RPC batch (number of members).", parse_positive_int),
    Setting("command_timeout", "seconds", 30.0,
            "Hard timeout for short helper commands such as blkid; the whole "
            "process group is killed when it passes.", parse_seconds),
    # -- tasks (vdsm_agent/tasks, docs/tasks.md) --
    Setting("max_running_tasks", "integer", 4,
            "Tasks that may run at once; more wait in state accepted and start in "
            "submission order as slots free.", parse_positive_int),
    Setting("max_queued_tasks", "integer", 1000,
            "Tasks that may wait in state accepted; beyond it startTask answers QueueFull.",
            parse_positive_int),
    Setting("task_zygote", "boolean", True,
            "Start task processes by forking a pre-started Python process (the zygote, "
            "python -m vdsm_agent.tasks.zygote) rather than starting Python for each: "
            "0.1-0.15 s less per task. Off: each is spawned as python -m "
            "vdsm_agent.tasks.child.", parse_bool),
    Setting("heartbeat_interval", "seconds", 2.0,
            "How often a task process rewrites its status file (heartbeat and progress).",
            parse_seconds),
    Setting("stale_after", "seconds", 30.0,
            "A running task with no heartbeat for this long becomes stale (it goes back "
            "to running when the heartbeat resumes).", parse_seconds),
    Setting("cancel_grace", "seconds", 10.0,
            "Seconds between SIGTERM and SIGKILL to a task's process group when it is "
            "cancelled or passes its deadline.", parse_seconds),
    Setting("output_max_bytes", "integer", 16 * 1024 * 1024,
            "Output kept on disk per task (at least 4096); the oldest bytes are dropped "
            "beyond it and getTaskOutput reports truncatedBefore.", parse_output_cap),
    Setting("retention_done", "seconds", 3600.0,
            "Finished tasks in state done or canceled are deleted this long after they end.",
            parse_seconds),
    Setting("retention_failed", "seconds", 7 * 86400.0,
            "Finished tasks in state failed or interrupted are deleted this long after "
            "they end (kept longer than done ones, for debugging).", parse_seconds),
    Setting("max_finished_tasks", "integer", 10000,
            "At most this many finished tasks are kept (oldest done/canceled removed "
            "first); unfinished tasks are never removed.", parse_positive_int),
    Setting("task_io_rate_limit", "integer", 0,
            "Bytes per second each data-moving task (checksum, wipe, copy) may read or "
            "write; 0: unlimited.", parse_non_negative_int),
    Setting("task_nice", "integer", 10,
            "CPU niceness (0-19) added to each task's process and the tools it runs "
            "(mkfs, e2fsck, qemu-img); 0: the agent's own priority.", parse_nice),
    Setting("task_ionice_class", "choice", "idle",
            "I/O scheduling class of each task's process and its tools: idle (only when "
            "nothing else needs the disk), best-effort (lowest level, 7) or none (inherit). "
            "Honoured by I/O schedulers such as bfq.", parse_ionice_class),
    Setting("enable_test_kinds", "boolean", False,
            "Offer the test-only task kinds (test.sleep); for the test suite, never "
            "in production.", parse_bool),
    Setting("gluster_discovery_interval", "seconds", 10.0,
            "How often the agent asks glusterd for rebalance and remove-brick tasks "
            "started outside it (the gluster CLI) and follows each as a task of its own "
            "(docs/gluster.md); 0: never. Off without the gluster CLI.",
            parse_non_negative_seconds),
    # -- storage connections (vdsm_agent/connections, docs/connections.md) --
    Setting("mount_root", "path", "",
            "Directory under which storage is mounted, one sub-directory per URI scheme. "
            "Empty: STATE_DIR/mnt (packages set /run/vdsm-agent/mnt).", parse_path),
    Setting("probe_interval", "seconds", 10.0,
            "How often each managed connection is probed; a probe that has not answered "
            "within one interval is a timeout.", parse_seconds),
    Setting("probe_failures", "integer", 3,
            "Failed probes in a row that make a connection disconnected (the first makes "
            "it degraded).", parse_positive_int),
    Setting("probe_recoveries", "integer", 2,
            "Good probes in a row before a failed connection is connected again "
            "(no flapping).", parse_positive_int),
    Setting("probe_workers", "integer", 32,
            "Threads for health probes (a probe hung in the kernel holds one until it "
            "returns; never more than one per connection).", parse_positive_int),
    Setting("backoff_base", "seconds", 2.0,
            "Reconnect backoff: the delay after n failed attempts is uniform(0, "
            "min(cap, base * 2^n)), at least the floor.", parse_seconds),
    Setting("backoff_cap", "seconds", 120.0,
            "Reconnect backoff: the largest delay between attempts.", parse_seconds),
    Setting("backoff_floor", "seconds", 1.0,
            "Reconnect backoff: the smallest delay between attempts.", parse_seconds),
    Setting("backoff_reset", "seconds", 60.0,
            "A connection connected this long has its failed-attempt count (the backoff "
            "exponent) reset.", parse_seconds),
    Setting("connect_timeout", "seconds", 60.0,
            "Hard timeout for mount, losetup and iSCSI discovery/login; the whole process "
            "group is killed when it passes.", parse_seconds),
    Setting("disconnect_timeout", "seconds", 10.0,
            "Hard timeout for umount (then umount -f -l), losetup -d and iSCSI logout.",
            parse_seconds),
    Setting("sshfs_identity_file", "path", "",
            "SSH private key for sshfs connections (ssh -o IdentityFile). Empty: ssh's "
            "default keys of the agent's user.", parse_path),
    Setting("sshfs_host_key_checking", "choice", "yes",
            "ssh StrictHostKeyChecking for sshfs: " + ", ".join(SSH_HOST_KEY_POLICIES)
            + " (yes: the host key must already be in the known hosts file).",
            parse_host_key_policy),
    Setting("sshfs_known_hosts_file", "path", "",
            "ssh UserKnownHostsFile for sshfs. Empty: ssh's default.", parse_path),
    # -- events feed (vdsm_agent/events, docs/events.md) --
    Setting("events_max", "integer", 10000,
            "Events kept in memory for getEvents and GET /events; a caller further "
            "behind gets gap=true and resynchronises from the full lists.",
            parse_positive_int),
    Setting("events_progress_interval", "seconds", 1.0,
            "At most one task progress event per task per this many seconds (state "
            "changes are never throttled and carry the current progress).", parse_seconds),
    Setting("events_max_wait", "seconds", 60.0,
            "Longest getEvents long-poll (its timeout); a larger timeout is InvalidParams.",
            parse_seconds),
    Setting("stream_keepalive_interval", "seconds", 15.0,
            "A followed stream with nothing to send sends a keep-alive this often, so "
            "that proxies and clients do not time it out: a keepalive line on GET "
            "/events?follow=1, a NUL byte on GET /tasks/ID/output?follow=1&keepalive=1.",
            parse_seconds),
    Setting("stream_stall_timeout", "seconds", 60.0,
            "A followed stream whose client takes nothing for this long while data waits "
            "for it is disconnected (meanwhile it holds at most 128 KiB of unsent data).",
            parse_seconds),
    # -- security and limits (vdsm_agent/security, docs/security.md) --
    Setting("tls_listen", "HOST:PORT", "",
            "TCP address for HTTPS: TLS 1.2 or newer, a client certificate signed by a CA "
            "of tls_ca required (its subject CN or subjectAltName is the caller's "
            "identity). Any address may be used. Empty: no TLS listener.",
            parse_optional_host_port),
    Setting("tls_cert", "path", "",
            "PEM certificate (with its chain) of the TLS listener.", parse_path),
    Setting("tls_key", "path", "",
            "PEM private key of tls_cert, not encrypted (keep it mode 0600).", parse_path),
    Setting("tls_ca", "path", "",
            "PEM bundle of the CA certificates whose client certificates are accepted.",
            parse_path),
    Setting("roles", "IDENTITY=ROLE list", (),
            "Roles of callers (none, read, operate, admin): in the file a [roles] section "
            "of 'identity = role' lines; on the command line --role IDENTITY=ROLE, "
            "repeated. Identities: a certificate name (CN or subjectAltName), uid:N or "
            "user:NAME for local callers; compared case-insensitively.",
            parse_role_entry, flag="--role", repeatable=True, ini_section="roles"),
    Setting("default_role", "choice", "none",
            "Role of a caller that [roles] does not list: a certificate from the CA, a "
            "local user other than root and the agent's own user. none: every call "
            "is Forbidden.", parse_role_name),
    Setting("loopback_role", "choice", "",
            "Role of every caller on the plain loopback TCP listener, whoever they are: "
            "any process on the host can connect there, and nothing attests its user. "
            "Empty: default_role. Privileged local work goes through the Unix socket "
            "(SO_PEERCRED).",
            parse_optional_role_name),
    Setting("loopback_metrics", "boolean", True,
            "GET /metrics answers every caller on the plain loopback TCP listener, "
            "whatever its role (what a Prometheus on the host scrapes): counts and "
            "durations only, no task IDs, paths or URIs. Off: it needs role read there "
            "too, as it always does on TLS and the Unix socket.", parse_bool),
    Setting("audit_log", "path", "",
            "File that also receives the audit log (one JSON object per line; reopened "
            "after logrotate moves it). Empty: the audit lines go to the agent's log only "
            "(logger vdsm_agent.audit).", parse_path),
    Setting("max_concurrent_requests", "integer", 256,
            "JSON-RPC calls (a batch counts one per member) and streams served at once; "
            "beyond it calls answer LimitExceeded at once.", parse_positive_int),
    Setting("max_requests_per_connection", "integer", 100,
            "JSON-RPC calls (a batch counts one per member) and streams in flight on one "
            "connection; beyond it calls answer LimitExceeded at once.", parse_positive_int),
    Setting("task_max_wait", "seconds", 600.0,
            "Longest waitTask long-poll (its timeout; between its default, 30, and 3600); "
            "a larger timeout is InvalidParams.", parse_task_max_wait),
    Setting("max_long_polls", "integer", 64,
            "Long-polls (waitTask, getEvents) and streams (GET /events, GET "
            "/tasks/ID/output) served at once, whoever calls; each also holds one of "
            "max_concurrent_requests. Beyond it they answer LimitExceeded at once.",
            parse_positive_int),
    Setting("reserved_requests", "integer", 16,
            "Of max_concurrent_requests, the slots only admin callers may take (root on "
            "the Unix socket is admin); at most a quarter of max_concurrent_requests.",
            parse_non_negative_int),
    Setting("max_connections", "integer", 1000,
            "Open connections on each TCP listener (plain and TLS); a connection beyond "
            "it is closed at once, unread. TCP connections also leave free the file "
            "descriptors that the Unix socket and the agent's own work need.",
            parse_positive_int),
    Setting("unix_max_connections", "integer", 64,
            "Open connections on the Unix socket (its own cap and descriptors, apart "
            "from TCP); the last 8 are kept for root and the agent's own user.",
            parse_positive_int),
    Setting("header_timeout", "seconds", 10.0,
            "A new connection must send a complete request head within this many "
            "seconds (a TLS connection: finish its handshake too), and a request's body "
            "must arrive within it; otherwise the connection is closed.", parse_seconds),
    Setting("keepalive_timeout", "seconds", 60.0,
            "An idle connection is closed this many seconds after its last answer "
            "unless its next request head has arrived.", parse_seconds),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}


AGENT = SettingsTable(SETTINGS, SECTION)


class Config(AgentFields, BaseConfig):
    """The agent's resolved settings: one typed attribute per setting."""

    table: ClassVar[SettingsTable] = AGENT

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def unix_socket_path(self) -> Path | None:
        configured = self.unix_socket
        if configured.lower() == "none":
            return None
        return Path(configured) if configured else self.state_path / "agent.sock"


def defaults() -> Config:
    return Config.defaults()


def read_config_file(path: str) -> dict[str, Any]:
    return AGENT.read_config_file(path)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (values stay strings until ``resolve``)."""
    AGENT.add_flags(parser)


def resolve(config_file: str | None, flags: argparse.Namespace) -> Config:
    """Defaults, then the config file, then flags that were given."""
    return Config.resolve(config_file, flags)


def render_docs(settings: Sequence[Setting] = SETTINGS) -> str:
    """docs/configuration.md, generated."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from vdsm_agent/settings.py by `python -m vdsm_agent.settings`;"
        " do not edit. -->",
        "",
        "The agent reads an INI file given with `--config FILE`; every setting lives in",
        f"the `[{SECTION}]` section and can also be given as a command-line flag, which",
        "wins over the file. List settings take one value per line in the file and a",
        "repeated flag on the command line.",
        "",
        *SettingsTable(settings, SECTION).docs_table(),
    ]
    lines += [
        "",
        "Example:",
        "",
        "```ini",
        f"[{SECTION}]",
        "state_dir = /var/lib/vdsm-agent",
        "listen = 127.0.0.1:54321",
        "unix_socket = /run/vdsm-agent/agent.sock",
        "allowed_roots =",
        "    /var/lib/vdsm-agent/images",
        "    /srv/images",
        "tls_listen = 0.0.0.0:54322",
        "tls_cert = /etc/pki/vdsm-agent/server.pem",
        "tls_key = /etc/pki/vdsm-agent/server.key",
        "tls_ca = /etc/pki/vdsm-agent/ca.pem",
        "",
        "[roles]",
        "# identity = role (none, read, operate, admin); see docs/security.md",
        "engine.example.com = operate",
        "monitor.example.com = read",
        "user:alice = read",
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--fields"]:
        AGENT.write_fields("AgentFields", "vdsm_agent.settings",
                           Path(__file__).with_name("settings_fields.py"))
    else:
        print(render_docs(), end="")
