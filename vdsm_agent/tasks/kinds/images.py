"""Images read by descriptor for ``copy``: probe, backing chain, ``json:`` specs.

``qemu-img`` is never given an image's name, only ``/dev/fd/N`` of a
descriptor resolved beneath an allowed root (``paths``). A qcow2 image is
probed layer by layer: each backing file a layer names (a relative name
against that layer's resolved directory) is resolved and probed by
descriptor in turn (``qemu-img info`` never opens a backing file), and the
whole chain is handed to ``qemu-img convert`` as one ``json:`` spec with an
explicit ``backing`` after every layer (null after the last), so qemu-img
opens no name an image records. A qcow2 image with an external data file is
refused: its header is read through the descriptor before qemu-img sees it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Any

from vdsm_agent import errors
from vdsm_agent.tasks.kinds import paths

FORMATS = ("raw", "qcow2")
INFO_TIMEOUT = 60.0
MAX_CHAIN = 16
# A name qemu would take for a protocol (nbd:, file:, json:...), not a file.
PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
SOURCE = "params.params.source"
# qcow2 header: magic, version (u32 at 4), incompatible features (u64 at 72, v3).
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_HEADER = 80
QCOW2_EXTERNAL_DATA = 1 << 2


def qcow2_external_data(target: paths.Target, field: str) -> bool:
    """Whether the image is a qcow2 whose header names an external data file (read
    through the descriptor, before qemu-img is let near it: qemu-img info would
    open that file by its name)."""
    fd = paths.open_data(target, os.O_RDONLY, field)
    try:
        header = os.pread(fd, QCOW2_HEADER, 0)
    finally:
        os.close(fd)
    if len(header) < QCOW2_HEADER or header[:4] != QCOW2_MAGIC:
        return False
    version, = struct.unpack_from(">I", header, 4)
    incompatible, = struct.unpack_from(">Q", header, 72)
    return version >= 3 and bool(incompatible & QCOW2_EXTERNAL_DATA)


def refuse_external_data(target: paths.Target, field: str) -> None:
    if qcow2_external_data(target, field):
        raise errors.InvalidParams(f"{target.path} is a qcow2 image with an external data "
                                   "file, which copy does not read or write", field=field,
                                   rule="dataFile")


def file_node(target: paths.Target) -> dict[str, Any]:
    """The protocol node of a ``json:`` spec: the descriptor, as a file or a device."""
    driver = "host_device" if target.kind == "device" else "file"
    return {"driver": driver, "filename": target.fd_path}


def image_info(target: paths.Target, fmt: str | None, field: str) -> dict[str, Any]:
    """``qemu-img info`` of one image by descriptor (never its backing chain)."""
    from vdsm_agent.system import commands  # pulls in asyncio: only when needed

    if fmt != "raw":
        refuse_external_data(target, field)
    argv = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), "--",
            target.fd_path]
    try:
        result = commands.run(argv, timeout=INFO_TIMEOUT, pass_fds=(target.fd,))
    except commands.CommandError as exc:
        raise errors.InvalidParams(f"cannot inspect {target.path}: {exc}", field=field,
                                   rule="image") from None
    if not result.ok:
        raise errors.InvalidParams(f"qemu-img cannot read {target.path}: "
                                   f"{result.stderr.strip()}", field=field, rule="image")
    info = json.loads(result.stdout)
    assert isinstance(info, dict)
    if info.get("format") not in FORMATS:
        raise errors.InvalidParams(f"{target.path} is a {info.get('format')} image; copy "
                                   f"reads {', '.join(FORMATS)}", field=field, rule="format")
    if "data-file" in info.get("format-specific", {}).get("data", {}):
        raise errors.InvalidParams(f"{target.path} is a qcow2 image with an external data "
                                   "file, which copy does not read or write", field=field,
                                   rule="dataFile")
    return info


@dataclasses.dataclass
class Layer:
    """One image of a source's chain: its descriptor and what qemu-img said of it."""

    target: paths.Target
    info: dict[str, Any]

    @property
    def format(self) -> str:
        return str(self.info["format"])


def backing_path(layer: Layer, field: str) -> str | None:
    """The path of the backing file a layer names (None: it has none).

    A relative name is taken against the layer's resolved directory, as
    qemu-img would; the result is then confined like any caller's path.
    """
    name = layer.info.get("backing-filename")
    if name is None:
        return None
    if not isinstance(name, str) or not name or PROTOCOL.match(name):
        raise errors.PathNotAllowed(f"{layer.target.path}: backing file {name!r} is not a "
                                    "local path", field=field, path=layer.target.path,
                                    rule="backing")
    joined = name if name.startswith("/") else os.path.join(
        os.path.dirname(layer.target.path), name)
    # Lexical: every component is then resolved without following a symlink.
    return os.path.normpath(joined)


@dataclasses.dataclass
class Source:
    """A source image and its backing chain, each by descriptor (close it)."""

    layers: list[Layer]

    @property
    def image(self) -> Layer:
        return self.layers[0]

    @property
    def size(self) -> int:
        return int(self.image.info["virtual-size"])

    def args(self) -> list[str]:
        """How qemu-img is told about the source (format options, then the image)."""
        if self.image.format == "raw":
            return ["-f", "raw", self.image.target.fd_path]
        return ["json:" + json.dumps(self.spec(), separators=(",", ":"))]

    def format_args(self) -> list[str]:
        return self.args()[:-1]

    def spec(self) -> dict[str, Any]:
        """The chain as one ``json:`` spec, every layer by descriptor, ``backing``
        explicit (qemu-img then opens no name an image records)."""
        node: dict[str, Any] | None = None
        for layer in reversed(self.layers):
            below = node
            node = {"driver": layer.format, "file": file_node(layer.target)}
            if layer.format == "qcow2":
                node["backing"] = below
        assert node is not None
        return node

    def fds(self) -> dict[int, str]:
        return {layer.target.fd: layer.target.path for layer in self.layers}

    def close(self) -> None:
        for layer in self.layers:
            layer.target.close()


def inspect_source(path: str, fmt: str | None, roots: tuple[str, ...],
                   field: str = SOURCE) -> Source:
    """The source and its backing chain, resolved and probed layer by layer."""
    source = Source([])
    try:
        target = paths.resolve(path, roots, field)
        source.layers.append(Layer(target, {}))
        source.layers[0].info = image_info(target, fmt, field)
        layer = source.image
        while (backing := backing_path(layer, field)) is not None:
            if len(source.layers) >= MAX_CHAIN:
                raise errors.InvalidParams(f"{path}: the backing chain is longer than "
                                           f"{MAX_CHAIN} images", field=field, rule="chain")
            target = paths.resolve(backing, roots, field)
            layer = Layer(target, {})
            source.layers.append(layer)
            if any(paths.same_inode(target, other.target) for other in source.layers[:-1]):
                raise errors.InvalidParams(f"{path}: the backing chain loops at {backing}",
                                           field=field, rule="chain")
            layer.info = image_info(target, layer_format(source.layers[-2]), field)
    except BaseException:
        source.close()
        raise
    return source


def layer_format(above: Layer) -> str | None:
    """The format the layer above records for its backing file (None: probe it)."""
    fmt = above.info.get("backing-filename-format")
    return fmt if isinstance(fmt, str) else None
