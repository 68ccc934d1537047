"""The settings machinery: a table of settings drives everything made of them.

A program's settings are one ``SettingsTable`` of ``Setting`` rows (name,
type shown in the docs, default, help, parser). From it come the defaults,
the INI file's section, one command-line flag per setting, the docs table
and the typed config: ``SettingsTable.fields_module`` renders a frozen
dataclass with one attribute per setting, typed by the return type of its
parser (a list of it when repeatable), which is committed beside the table
(a test fails when it is stale) so that strict mypy sees ``config.listen``
as ``tuple[str, int]``. A program's config class is that dataclass plus
``BaseConfig``.

The agent's table is ``vdsm_agent.settings``, the engine's
``vdsm_agent.engine.settings``. Precedence: built-in default < config file <
command line.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self


class SettingsError(ValueError):
    """A config file or flag value that cannot be used; the message says which."""


# -- parsers shared by the tables -------------------------------------------------------

LOG_LEVELS = ("debug", "info", "warning", "error")


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


def parse_seconds(text: str) -> float:
    number = float(text)
    if number <= 0:
        raise ValueError(f"must be a positive number of seconds, got {number}")
    return number


def parse_path(text: str) -> str:
    return os.path.expanduser(text.strip())


# -- the table -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    type: str  # shown in the docs: "string", "integer", "path", ...
    default: Any
    help: str
    parse: Callable[[str], Any]
    flag: str = ""  # defaults to --name-with-dashes
    repeatable: bool = False  # a list: a repeated flag, or one per line in the INI file
    # A list that also has an INI section of its own: each "key = value" line of
    # [ini_section] is one item "key=value" (e.g. [roles]: "uid:0 = admin").
    ini_section: str = ""

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def python_type(self) -> str:
        """The attribute's type in the typed config, as source text: what the
        parser returns (``from __future__ import annotations`` keeps it as
        written), in a list when the setting is repeatable."""
        returns = str(self.parse.__annotations__["return"])
        return f"list[{returns}]" if self.repeatable else returns


def format_default(setting: Setting) -> str:
    default = setting.default
    if isinstance(default, bool):
        return "true" if default else "false"
    if setting.repeatable:
        return ", ".join(default) if default else "(none)"
    return str(default) if default != "" else "(empty)"


def _convert(setting: Setting, raw: Iterable[str], origin: str) -> Any:
    items = [item for item in raw if item.strip()] if setting.repeatable else list(raw)
    try:
        converted = [setting.parse(item) for item in items]
    except ValueError as exc:
        raise SettingsError(f"{origin}: {setting.name}: {exc}") from None
    return converted if setting.repeatable else converted[-1]


class SettingsTable:
    """One program's settings: the table, its INI section, and what is made of them."""

    def __init__(self, settings: Sequence[Setting], section: str) -> None:
        self.settings = tuple(settings)
        self.section = section
        self.by_name = {setting.name: setting for setting in self.settings}
        if len(self.by_name) != len(self.settings):
            raise ValueError(f"[{section}]: a setting is listed twice")

    def default_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for setting in self.settings:
            default = setting.default
            values[setting.name] = (
                [setting.parse(item) for item in default] if setting.repeatable
                else setting.parse(str(default)) if not isinstance(default, bool)
                else default
            )
        return values

    def read_config_file(self, path: str) -> dict[str, Any]:
        # Only "=" separates a key from its value: keys such as "uid:0" ([roles]) hold ":".
        parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
        try:
            with open(path, encoding="utf-8") as stream:
                parser.read_file(stream)
        except OSError as exc:
            raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
        except configparser.Error as exc:
            raise SettingsError(f"config file {path}: {exc}") from None
        values: dict[str, Any] = {}
        for listed in self.settings:
            if listed.ini_section and parser.has_section(listed.ini_section):
                items = [f"{key}={raw}" for key, raw in parser.items(listed.ini_section)]
                values[listed.name] = _convert(
                    listed, items, f"config file {path}: [{listed.ini_section}]")
        section = self.section
        if not parser.has_section(section):
            return values
        for key, raw in parser.items(section):
            setting = self.by_name.get(key)
            if setting is None:
                raise SettingsError(
                    f"config file {path}: unknown setting {key!r} in [{section}]")
            lines = raw.splitlines() if setting.repeatable else [raw]
            converted = _convert(setting, lines, f"config file {path}")
            values[key] = [*converted, *values[key]] if setting.ini_section and \
                key in values else converted
        return values

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        """Add one flag per setting (values stay strings until ``given_flags``)."""
        for setting in self.settings:
            parser.add_argument(
                setting.option,
                dest=setting.name,
                action="append" if setting.repeatable else "store",
                metavar=setting.type.upper().replace(" ", "_"),
                # argparse treats "%" in help as a format directive.
                help=f"{setting.help} (default: {format_default(setting)})".replace("%", "%%"),
            )

    def given_flags(self, flags: argparse.Namespace) -> dict[str, Any]:
        """The settings given as flags, converted."""
        given: dict[str, Any] = {}
        for setting in self.settings:
            raw = getattr(flags, setting.name, None)
            if raw is None:
                continue
            given[setting.name] = _convert(
                setting, raw if setting.repeatable else [raw], f"flag {setting.option}"
            )
        return given

    def docs_table(self) -> list[str]:
        """The Markdown table of the settings (for the generated docs)."""
        lines = [
            "| setting | flag | type | default | meaning |",
            "| --- | --- | --- | --- | --- |",
        ]
        for setting in self.settings:
            lines.append(
                f"| `{setting.name}` | `{setting.option}` | {setting.type} | "
                f"`{format_default(setting)}` | {setting.help} |"
            )
        return lines

    def fields_module(self, class_name: str, table_module: str) -> str:
        """The source of the typed config's fields, committed as ``<table
        module>_fields.py`` (``python -m <table module> --fields`` rewrites it)."""
        lines = [
            f'"""The typed attributes of the [{self.section}] settings: one per row of',
            f"the table in ``{table_module}``, typed by what its parser returns.",
            "",
            f"Generated by ``python -m {table_module} --fields``; do not edit (a test",
            "fails when it is stale).",
            '"""',
            "",
            "from __future__ import annotations",
            "",
            "import dataclasses",
            "",
            "",
            "@dataclasses.dataclass(frozen=True)",
            f"class {class_name}:",
        ]
        lines += [f"    {setting.name}: {setting.python_type}" for setting in self.settings]
        return "\n".join(lines) + "\n"

    def write_fields(self, class_name: str, table_module: str, path: Path) -> None:
        """Rewrite the fields module at ``path`` (it is imported by the table's own
        module, so it is rewritten in place rather than through a shell redirect,
        which would empty it before the table could be imported)."""
        path.write_text(self.fields_module(class_name, table_module))


class BaseConfig:
    """Resolved settings of one table, mixed with the table's generated fields
    dataclass (``class Config(AgentFields, BaseConfig)``): its attributes are
    the setting names, typed."""

    table: ClassVar[SettingsTable]

    if TYPE_CHECKING:
        # Every config class is a dataclass of its table's fields (keywords only).
        def __init__(self, **values: Any) -> None: ...

    @property
    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.table.by_name}

    def replace(self, **changes: Any) -> Self:
        unknown = set(changes) - set(self.table.by_name)
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
        return type(self)(**{**self.values, **changes})

    @classmethod
    def defaults(cls) -> Self:
        missing = set(cls.table.by_name) - set(getattr(cls, "__dataclass_fields__", ()))
        if missing:
            raise SettingsError(
                f"{cls.__name__} has no attribute for {', '.join(sorted(missing))}: its fields "
                f"module is stale (run python -m {cls.__module__} --fields)")
        return cls(**cls.table.default_values())

    @classmethod
    def resolve(cls, config_file: str | None, flags: argparse.Namespace) -> Self:
        """Defaults, then the config file, then flags that were given."""
        config = cls.defaults()
        if config_file:
            config = config.replace(**cls.table.read_config_file(config_file))
        return config.replace(**cls.table.given_flags(flags))
