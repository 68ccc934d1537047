"""Parsing and validating connection URIs, before anything runs.

Every value that ends up on a command line (``mount``, ``sshfs``,
``iscsiadm``, ``losetup``) or in a path comes out of a URI through this
module. The rules are deliberately narrow: a host is a DNS name, an IPv4
address or a bracketed IPv6 address; a path is absolute, normalised, and free
of whitespace, control characters and commas; nothing may start with ``-``.
So no value can become an option of a tool, a second mount option (commas),
or a second argument (whitespace), whatever the caller sends.

Each backend parses its own scheme with these helpers; ``scheme_of`` picks the
backend. The canonical form of a URI (``Endpoint.uri``) is what the API shows
and what idempotency compares; ``Endpoint.key`` names the target, and IDs with
the same key share one connection.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import posixpath
import re
import urllib.parse
from collections.abc import Collection

from vdsm_agent.errors import InvalidUri
from vdsm_agent.security import redact

MAX_URI_LENGTH = 4096
# A mount point name is one path component.
MAX_NAME_BYTES = 255

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# Printable ASCII without space: what may appear in a URI at all.
_URI_CHARS = re.compile(r"^[\x21-\x7e]+$")
# After percent-decoding: no control characters, no whitespace (incl. Unicode
# ones), no commas (mount option separators), no NUL.
_BAD_PATH_CHARS = re.compile(r"[\x00-\x20\x7f,\s]")
# Query values may hold commas (a list of mount options, checked by the backend).
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x20\x7f\s]")
_NAME_ESCAPES = re.compile(r"%25|%5F|_")
_NAME_UNESCAPE = {"%25": "%", "%5F": "_", "_": "/"}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A parsed, validated URI. Backends subclass it with their own fields."""

    scheme: str
    uri: str  # canonical form
    key: str  # the target: IDs with the same key share one connection


def invalid(uri: str, part: str, detail: str) -> InvalidUri:
    """An InvalidUri naming the offending part (the URI is echoed, redacted and truncated)."""
    return InvalidUri(detail, uri=redact.uri(uri)[:256], part=part)


def scheme_of(uri: str) -> str:
    """The lower-cased scheme of ``uri``; InvalidUri when there is none."""
    match = _SCHEME.match(uri)
    if match is None:
        raise invalid(uri, "scheme", "expected SCHEME://..., e.g. nfs://server/export")
    return match.group(1).lower()


def split(uri: str, *, query: bool = False, userinfo: bool = False,
          authority: bool = True) -> urllib.parse.SplitResult:
    """Split ``uri`` after the checks every scheme shares."""
    if len(uri) > MAX_URI_LENGTH:
        raise invalid(uri, "uri", f"longer than {MAX_URI_LENGTH} characters")
    if not _URI_CHARS.match(uri):
        raise invalid(uri, "uri", "whitespace, control or non-ASCII characters "
                                  "(percent-encode them)")
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError as exc:
        raise invalid(uri, "uri", f"does not parse: {exc}") from None
    if parts.fragment or uri.endswith("#"):
        raise invalid(uri, "fragment", "a fragment (#...) is not allowed")
    if parts.query and not query:
        raise invalid(uri, "query", "this scheme takes no query (?...)")
    if not authority and parts.netloc:
        raise invalid(uri, "host", "this scheme takes no host: use SCHEME:///absolute/path")
    if authority and not parts.netloc:
        raise invalid(uri, "host", "a host is required")
    if "@" in parts.netloc and not userinfo:
        raise invalid(uri, "user", "this scheme takes no user@")
    return parts


def host(uri: str, raw: str | None) -> str:
    """A DNS name, IPv4 address or bracketed IPv6 address, lower-cased."""
    if not raw:
        raise invalid(uri, "host", "a host is required")
    text = urllib.parse.unquote(raw)
    if text.startswith("[") and text.endswith("]"):
        try:
            address = ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            raise invalid(uri, "host", f"not an IPv6 address: {text[:64]!r}") from None
        return f"[{address.compressed}]"
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if len(text) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise invalid(uri, "host", f"not a host name or address: {text[:64]!r}")
    if labels[-1].isdigit():
        raise invalid(uri, "host", f"not a host name or address: {text[:64]!r}")
    return text.rstrip(".").lower()


def authority(uri: str, parts: urllib.parse.SplitResult) -> tuple[str | None, str, int | None]:
    """``(user, host, port)`` of the URI's authority; user and port may be None.

    The user is left for the backend to check (only sshfs takes one).
    """
    user, at, hostport = parts.netloc.rpartition("@")
    if hostport.startswith("["):
        closing = hostport.find("]")
        if closing < 0:
            raise invalid(uri, "host", "unterminated IPv6 address")
        raw_host, rest = hostport[:closing + 1], hostport[closing + 1:]
    else:
        raw_host, colon, raw_port = hostport.partition(":")
        rest = colon + raw_port
    port: int | None = None
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6:
            raise invalid(uri, "port", "the port must be a number from 1 to 65535")
        port = int(rest[1:])
        if not 1 <= port <= 65535:
            raise invalid(uri, "port", "the port must be a number from 1 to 65535")
    return (urllib.parse.unquote(user) if at else None), host(uri, raw_host), port


def absolute_path(uri: str, raw: str, part: str = "path") -> str:
    """A percent-decoded, absolute, normalised path with only safe characters.

    A trailing slash is dropped; ``.`` and ``..`` components and empty
    components (``//``) are refused rather than normalised, so that a URI
    means exactly one path.
    """
    try:
        text = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise invalid(uri, part, "the path is not valid UTF-8") from None
    if not text.startswith("/"):
        raise invalid(uri, part, "an absolute path is required")
    if _BAD_PATH_CHARS.search(text):
        raise invalid(uri, part, "the path has whitespace, control characters or commas")
    if len(text) > 1 and text.endswith("/"):
        text = text[:-1]
    components = text.split("/")[1:]
    if text != "/" and any(c in ("", ".", "..") for c in components):
        raise invalid(uri, part, "the path has empty, '.' or '..' components")
    if posixpath.normpath(text) != text:
        raise invalid(uri, part, "the path is not normalised")
    return text


def query_params(uri: str, raw: str, allowed: Collection[str]) -> dict[str, str]:
    """The query as a dict; unknown or repeated keys are InvalidUri."""
    if not raw:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise invalid(uri, "query", "the query does not parse") from None
    result: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise invalid(uri, "query", f"unknown query parameter {name[:32]!r}; "
                                        f"allowed: {', '.join(sorted(allowed))}")
        if name in result:
            raise invalid(uri, "query", f"query parameter {name!r} given twice")
        if _BAD_VALUE_CHARS.search(value):
            raise invalid(uri, "query", f"query parameter {name!r} has whitespace or "
                                        "control characters")
        result[name] = value
    return result


def quote_path(path: str) -> str:
    """A path as it appears in a canonical URI."""
    return urllib.parse.quote(path, safe="/:@!$&'()*+;=-._~")


# -- mount point names ----------------------------------------------------------
#
# A mount point is MOUNT_ROOT/<scheme>/<name>, with <name> made from the
# canonical URI without "scheme://". VDSM's form ("server:_export", "_" -> "__",
# "/" -> "_") is readable but not one-to-one ("a_/b" and "a/_b" both give
# "a___b"); here "%" and "_" are percent-escaped first and then "/" becomes
# "_", which keeps the readable shape ("server_export_data") and can always be
# decoded back to exactly one target.


def encode_name(location: str) -> str:
    """The mount point name for ``location`` (the URI without "scheme://")."""
    name = location.replace("%", "%25").replace("_", "%5F").replace("/", "_")
    if name in ("", ".", ".."):
        raise ValueError(f"no mount point name for {location!r}")
    return name


def decode_name(name: str) -> str:
    """The location a mount point name was made from (inverse of encode_name)."""
    return _NAME_ESCAPES.sub(lambda match: _NAME_UNESCAPE[match.group(0)], name)


def check_name_length(uri: str, name: str) -> None:
    if len(name.encode()) > MAX_NAME_BYTES:
        raise invalid(uri, "uri", f"too long for a mount point name ({MAX_NAME_BYTES} bytes)")
