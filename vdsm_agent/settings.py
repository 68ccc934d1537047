"""The settings table: one list drives the INI file, the CLI flags and the docs.

Precedence: built-in default < config file (section ``[agent]``) < command line.
``docs/configuration.md`` is generated from ``SETTINGS`` (``python -m
vdsm_agent.settings``) and a test fails when it is stale.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

SECTION = "agent"


class SettingsError(ValueError):
    """A config file or flag value that cannot be used; the message says which."""


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false)")


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range: {number}")
    return host, number


def parse_log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    return level


def parse_positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError(f"must be at least 1, got {number}")
    return number


def parse_non_negative_int(text: str) -> int:
    number = int(text)
    if number < 0:
        raise ValueError(f"must be 0 or more, got {number}")
    return number


def parse_output_cap(text: str) -> int:
    number = int(text)
    if number < 4096:
        raise ValueError(f"must be at least 4096 bytes, got {number}")
    return number


def parse_seconds(text: str) -> float:
    number = float(text)
    if number <= 0:
        raise ValueError(f"must be a positive number of seconds, got {number}")
    return number


def parse_path(text: str) -> str:
    return os.path.expanduser(text.strip())


SSH_HOST_KEY_POLICIES = ("yes", "accept-new", "no")


def parse_host_key_policy(text: str) -> str:
    policy = text.strip()
    if policy not in SSH_HOST_KEY_POLICIES:
        raise ValueError(f"must be one of {', '.join(SSH_HOST_KEY_POLICIES)}")
    return policy


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    type: str  # shown in the docs: "string", "integer", "path", ...
    default: Any
    help: str
    parse: Callable[[str], Any]
    flag: str = ""  # defaults to --name-with-dashes
    repeatable: bool = False  # a list: a repeated flag, or one per line in the INI file

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


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
            "Bytes per second each data-moving task (checksum) may read; 0: unlimited.",
            parse_non_negative_int),
    Setting("enable_test_kinds", "boolean", False,
            "Offer the test-only task kinds (test.sleep); for the test suite, never "
            "in production.", parse_bool),
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
)

BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    """Resolved settings; attribute names are the setting names."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> Config:
        unknown = set(changes) - set(BY_NAME)
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
        return Config({**self.values, **changes})

    @property
    def state_path(self) -> Path:
        return Path(self.values["state_dir"]).resolve()

    @property
    def unix_socket_path(self) -> Path | None:
        configured = self.values["unix_socket"]
        if configured.lower() == "none":
            return None
        return Path(configured) if configured else self.state_path / "agent.sock"


def defaults() -> Config:
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        default = setting.default
        values[setting.name] = (
            [setting.parse(item) for item in default] if setting.repeatable
            else setting.parse(str(default)) if not isinstance(default, bool)
            else default
        )
    return Config(values)


def _convert(setting: Setting, raw: Iterable[str], origin: str) -> Any:
    items = [item for item in raw if item.strip()] if setting.repeatable else list(raw)
    try:
        converted = [setting.parse(item) for item in items]
    except ValueError as exc:
        raise SettingsError(f"{origin}: {setting.name}: {exc}") from None
    return converted if setting.repeatable else converted[-1]


def read_config_file(path: str) -> dict[str, Any]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as stream:
            parser.read_file(stream)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except configparser.Error as exc:
        raise SettingsError(f"config file {path}: {exc}") from None
    values: dict[str, Any] = {}
    if not parser.has_section(SECTION):
        return values
    for key, raw in parser.items(SECTION):
        setting = BY_NAME.get(key)
        if setting is None:
            raise SettingsError(f"config file {path}: unknown setting {key!r} in [{SECTION}]")
        lines = raw.splitlines() if setting.repeatable else [raw]
        values[key] = _convert(setting, lines, f"config file {path}")
    return values


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (values stay strings until ``resolve``)."""
    for setting in SETTINGS:
        parser.add_argument(
            setting.option,
            dest=setting.name,
            action="append" if setting.repeatable else "store",
            metavar=setting.type.upper().replace(" ", "_"),
            # argparse treats "%" in help as a format directive.
            help=f"{setting.help} (default: {format_default(setting)})".replace("%", "%%"),
        )


def resolve(config_file: str | None, flags: argparse.Namespace) -> Config:
    """Defaults, then the config file, then flags that were given."""
    config = defaults()
    if config_file:
        config = config.replace(**read_config_file(config_file))
    given: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = getattr(flags, setting.name, None)
        if raw is None:
            continue
        given[setting.name] = _convert(
            setting, raw if setting.repeatable else [raw], f"flag {setting.option}"
        )
    return config.replace(**given)


def format_default(setting: Setting) -> str:
    default = setting.default
    if isinstance(default, bool):
        return "true" if default else "false"
    if setting.repeatable:
        return ", ".join(default) if default else "(none)"
    return str(default) if default != "" else "(empty)"


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
        "| setting | flag | type | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for setting in settings:
        lines.append(
            f"| `{setting.name}` | `{setting.option}` | {setting.type} | "
            f"`{format_default(setting)}` | {setting.help} |"
        )
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
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_docs(), end="")
