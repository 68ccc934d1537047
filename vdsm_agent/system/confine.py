"""Confinement by file descriptor: a caller's path, resolved once, beneath its root.

The agent runs as root and writes where callers tell it to, so a path string
is never trusted twice. A caller's path is resolved **once**, to an ``O_PATH``
descriptor, beneath a descriptor of the allowed root it names:

* ``openat2(2)`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
  RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV``: the kernel refuses ``..`` out of
  the root, any symlink on the way (``ELOOP``), ``/proc`` magic links, and any
  mount crossing (``EXDEV``: a bind mount or another filesystem inside the root).
  Linux 5.6 or newer; on older kernels (``ENOSYS``) or where a sandbox blocks
  the call (``EPERM``), a walk of ``openat(O_NOFOLLOW)`` one component at a time
  does the same, comparing each component's mount ID (``/proc/self/fdinfo``).
* ``O_PATH`` opens nothing: no FIFO can block the resolver, no device's open
  has side effects. The descriptor is then checked (type, hard links) with
  ``fstat``, and whoever needs data *re-opens the descriptor* (``reopen``,
  through ``/proc/self/fd/N``, which names that inode and nothing else) or
  hands it to a tool as ``/dev/fd/N``.
* A regular file with more than one hard link is refused: a link inside the
  root to a file outside it would otherwise carry the outside file in.

Everything a caller gets wrong is an ``errors.*`` naming the field; nothing
here is ever an ``OSError`` to the caller.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import os
import stat
from collections.abc import Iterable

from vdsm_agent import errors

SYS_OPENAT2 = 437  # one number on every architecture (after the syscall table unification)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

DEV = "/dev"
PATH_FLAGS = os.O_PATH | os.O_CLOEXEC
# EAGAIN: openat2 saw a concurrent rename and refused to guess; try again.
_RETRIES = 8
NAME_MAX = 255


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p,
                     ctypes.POINTER(_OpenHow), ctypes.c_size_t]

# None: not tried yet; set by the first call. Tests force the fallback by setting False.
openat2_available: bool | None = None


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """The raw system call; OSError on failure (ENOSYS where the kernel lacks it)."""
    how = _OpenHow(flags, mode, resolve)
    fd = _syscall(SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how),
                  ctypes.sizeof(how))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return int(fd)


def mount_id(fd: int) -> int:
    """The mount ID of an open descriptor (``mnt_id`` in ``/proc/self/fdinfo``)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
        for line in info:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo")


def _walk(dirfd: int, relative: str) -> int:
    """``openat2(CONFINED)`` done by hand: ``O_NOFOLLOW`` per component, same mount."""
    root_mount = mount_id(dirfd)
    current = os.open(".", PATH_FLAGS | os.O_DIRECTORY, dir_fd=dirfd)
    try:
        names = relative.split("/")
        for position, name in enumerate(names):
            last = position == len(names) - 1
            flags = PATH_FLAGS | os.O_NOFOLLOW | (0 if last else os.O_DIRECTORY)
            try:
                following = os.open(name, flags, dir_fd=current)
            except NotADirectoryError:
                # A symlink in the middle fails O_DIRECTORY: say it like openat2 does.
                if stat.S_ISLNK(os.stat(name, dir_fd=current, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
                raise
            os.close(current)
            current = following
            if stat.S_ISLNK(os.fstat(current).st_mode):  # O_PATH|O_NOFOLLOW opens the link
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)
            if mount_id(current) != root_mount:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), name)
    except BaseException:
        os.close(current)
        raise
    return current


def open_path_beneath(dirfd: int, relative: str) -> int:
    """An ``O_PATH`` descriptor of ``relative`` beneath ``dirfd``, confined (see module)."""
    global openat2_available
    if openat2_available is not False:
        for _ in range(_RETRIES):
            try:
                fd = openat2(dirfd, relative, PATH_FLAGS, CONFINED)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    continue
                if exc.errno in (errno.ENOSYS, errno.EPERM) and openat2_available is None:
                    openat2_available = False  # an old kernel or a seccomp filter
                    break
                raise
            openat2_available = True
            return fd
        else:
            raise OSError(errno.EAGAIN, "the path kept changing while it was resolved",
                          relative)
    return _walk(dirfd, relative)


# -- a caller's path -------------------------------------------------------------------------


@dataclasses.dataclass
class Resolved:
    """A caller's path resolved to an ``O_PATH`` descriptor (close it, or use ``with``)."""

    fd: int
    path: str  # the name it was found by: the root, then the caller's components
    info: os.stat_result  # fstat of the descriptor
    kind: str  # "file" or "device"

    @property
    def identity(self) -> str:
        """The descriptor's identity (what a task records as ``target.identity``)."""
        if self.kind == "device":
            return f"dev:{os.major(self.info.st_rdev)}:{os.minor(self.info.st_rdev)}"
        return f"file:{self.info.st_dev}:{self.info.st_ino}"

    @property
    def fd_path(self) -> str:
        """The name of the descriptor for a tool it is passed to (``pass_fds``)."""
        return f"/dev/fd/{self.fd}"

    def reopen(self, flags: int) -> int:
        """A real descriptor of the same inode (``/proc/self/fd/N`` names nothing else)."""
        return os.open(f"/proc/self/fd/{self.fd}", flags | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Resolved:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _components(path: str, field: str) -> list[str]:
    """The caller's path as components: absolute, no NUL, no ``..``, names <= 255 bytes."""
    if not path.startswith("/") or "\0" in path:
        raise errors.InvalidParams("must be an absolute path", field=field, rule="path")
    names = [name for name in path.split("/") if name not in ("", ".")]
    if ".." in names:
        raise errors.PathNotAllowed(f"{path}: '..' is not allowed in a path", field=field,
                                    path=path, rule="dotdot")
    for name in names:
        # A character is at most 4 bytes: only a long name needs encoding to be measured.
        if len(name) > NAME_MAX // 4 and len(os.fsencode(name)) > NAME_MAX:
            raise errors.InvalidParams(f"{path}: a path component is longer than {NAME_MAX} "
                                       "bytes", field=field, rule="nameLength")
    return names


@functools.lru_cache(maxsize=64)
def _spellings(root: str) -> tuple[str, tuple[tuple[str, ...], ...]]:
    """A root as resolved, and its components as configured and as resolved
    (cached: roots are the administrator's, and this is on startTask's path)."""
    real = os.path.realpath(root)
    return real, tuple({tuple(name for name in spelling.split("/") if name)
                        for spelling in (os.path.normpath(root), real)})


def _root_of(names: list[str], roots: Iterable[str]) -> tuple[str, list[str]] | None:
    """The longest allowed root (as configured or resolved) that is a prefix of
    ``names``, by its resolved name (one name per file whichever spelling the
    caller used: a task's resources are named after it), and the components
    below it."""
    best: tuple[str, list[str]] | None = None
    for root in roots:
        real, prefixes = _spellings(root)
        for prefix in prefixes:
            if tuple(names[:len(prefix)]) == prefix and (
                    best is None or len(names) - len(prefix) < len(best[1])):
                best = (real, names[len(prefix):])
    return best


def _outside_roots(path: str, names: list[str], roots: tuple[str, ...],
                   found: tuple[str, list[str]] | None, field: str) -> errors.PathNotAllowed:
    """Why a caller's file path is beneath no allowed root, and where roots are set."""
    shown = [os.path.realpath(root) for root in roots]
    roots_now = f"allowed roots: {', '.join(shown)}" if shown else "no allowed root is set"
    reason = (f"{path} is a device; {field} takes an image file beneath an allowed root"
              if names[:1] == ["dev"] else f"{path} is not beneath an allowed root")
    detail = f"{reason} ({roots_now}; add one with --allowed-root DIR or setting allowed_roots)"
    if found is not None:  # the root itself: a directory, not a file in it
        detail = f"{path} is the allowed root {found[0]} itself; give a file beneath it"
    return errors.PathNotAllowed(detail, field=field, path=path, rule="allowedRoots",
                                 allowedRoots=shown, setting="allowed_roots")


def _split(path: str, roots: Iterable[str], field: str) -> tuple[str, list[str]]:
    """The root a caller's path is beneath, and its components below it (at least one)."""
    roots = tuple(roots)
    names = _components(path, field)
    found = _root_of(names, roots)
    if found is None or not found[1]:
        raise _outside_roots(path, names, roots, found, field)
    return found


def _refusal(exc: OSError, path: str, field: str, device: bool = False) -> errors.RpcError:
    """The caller's error for a failed resolution."""
    code = exc.errno
    if code == errno.ENOENT:
        if device:
            return errors.DeviceNotFound(f"{path} does not exist", field=field, path=path)
        return errors.InvalidParams(f"{path} does not exist", field=field, rule="exists")
    if code == errno.ELOOP:
        return errors.PathNotAllowed(f"{path}: symbolic links are not followed (a component "
                                     "is a symlink)", field=field, path=path, rule="symlink")
    if code == errno.EXDEV:
        return errors.PathNotAllowed(f"{path} is on another mount than its allowed root (a "
                                     "bind mount or another filesystem inside it); list that "
                                     "mount as an allowed root of its own", field=field,
                                     path=path, rule="mount")
    if code == errno.ENAMETOOLONG:
        return errors.InvalidParams(f"{path} is too long", field=field, rule="nameLength")
    if code == errno.ENOTDIR:
        return errors.InvalidParams(f"{path}: a component is not a directory", field=field,
                                    rule="exists")
    if code == errno.EAGAIN:
        return errors.PathNotAllowed(f"{path} kept changing while it was resolved",
                                     field=field, path=path, rule="changing")
    return errors.InvalidParams(f"cannot open {path}: {exc.strerror or exc}", field=field,
                                rule="open")


def _open_root(root: str, field: str) -> int:
    try:
        return os.open(root, PATH_FLAGS | os.O_DIRECTORY)
    except OSError as exc:
        raise errors.PathNotAllowed(f"the allowed root {root} cannot be opened: "
                                    f"{exc.strerror}", field=field, path=root,
                                    rule="root") from None


def _beneath(root: str, relative: str, path: str, field: str, device: bool = False) -> int:
    root_fd = _open_root(root, field)
    try:
        return open_path_beneath(root_fd, relative)
    except OSError as exc:
        raise _refusal(exc, path, field, device) from None
    finally:
        os.close(root_fd)


def resolve_file(path: str, roots: Iterable[str], field: str, *,
                 single_link: bool = True) -> Resolved:
    """A regular file beneath one of ``roots``; PathNotAllowed/InvalidParams otherwise.

    ``single_link``: refuse a file with more than one hard link (what links it
    elsewhere could be outside every root).
    """
    root, rest = _split(path, roots, field)
    fd = _beneath(root, "/".join(rest), path, field)
    resolved = Resolved(fd, os.path.join(root, *rest), os.fstat(fd), "file")
    try:
        if not stat.S_ISREG(resolved.info.st_mode):
            raise errors.InvalidParams(f"{path} is not a regular file", field=field,
                                       rule="regularFile")
        if single_link and resolved.info.st_nlink > 1:
            raise errors.PathNotAllowed(
                f"{path} has {resolved.info.st_nlink} hard links; a file linked elsewhere "
                "may be outside every allowed root", field=field, path=path, rule="hardLink")
    except BaseException:
        resolved.close()
        raise
    return resolved


def resolve_parent(path: str, roots: Iterable[str], field: str) -> tuple[Resolved, str]:
    """The directory a new file would go in (beneath a root), and the file's name."""
    root, rest = _split(path, roots, field)
    *dirs, name = rest
    fd = _beneath(root, "/".join(dirs) or ".", path, field)
    parent = Resolved(fd, os.path.join(root, *dirs), os.fstat(fd), "directory")
    if not stat.S_ISDIR(parent.info.st_mode):
        parent.close()
        raise errors.InvalidParams(f"the directory of {path} does not exist", field=field,
                                   rule="exists")
    return parent, name


def resolve_device(path: str, field: str) -> Resolved:
    """A block device under ``/dev``; its ``/dev`` symlinks (``by-id``...) resolved first.

    ``/dev`` belongs to root and udev, so its own links are trusted; the name
    they lead to is then resolved beneath ``/dev`` like any caller's path
    (no symlink, no other mount: ``/dev/shm`` is a tmpfs anyone may write).
    """
    _components(path, field)
    real = os.path.realpath(path)
    if not real.startswith(DEV + "/"):
        raise errors.PathNotAllowed(f"{path} is not a block device under /dev (it resolves "
                                    f"to {real})", field=field, path=path, rule="blockDevice")
    fd = _beneath(DEV, real[len(DEV) + 1:], path, field, device=True)
    resolved = Resolved(fd, real, os.fstat(fd), "device")
    if not stat.S_ISBLK(resolved.info.st_mode):
        resolved.close()
        raise errors.PathNotAllowed(f"{path} is not a block device (it is "
                                    f"{_file_type(resolved.info)}); give one such as "
                                    "/dev/loop1", field=field, path=path, rule="blockDevice")
    return resolved


_FILE_TYPES = {stat.S_IFCHR: "a character device", stat.S_IFDIR: "a directory",
               stat.S_IFREG: "a regular file", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def _file_type(info: os.stat_result) -> str:
    return _FILE_TYPES.get(stat.S_IFMT(info.st_mode), "another kind of file")


def resolve(path: str, roots: Iterable[str], field: str, *,
            single_link: bool = True) -> Resolved:
    """A block device when the path is under ``/dev``, else an image file beneath a root.

    A symlink under a root is never followed, not even into ``/dev``.
    """
    if _components(path, field)[:1] == ["dev"]:
        return resolve_device(path, field)
    return resolve_file(path, roots, field, single_link=single_link)


def create_file(parent: Resolved, name: str, path: str, field: str,
                mode: int = 0o640) -> Resolved:
    """Create ``name`` in ``parent`` (``O_EXCL``: never an existing file or a symlink)."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=parent.fd)
    except FileExistsError:
        raise errors.InvalidParams(f"{path} appeared while the task started", field=field,
                                   rule="exists") from None
    except OSError as exc:
        raise _refusal(exc, path, field) from None
    try:
        path_fd = os.open(f"/proc/self/fd/{fd}", PATH_FLAGS)
    finally:
        os.close(fd)
    return Resolved(path_fd, os.path.join(parent.path, name), os.fstat(path_fd), "file")


def remove_if_same(parent: Resolved, name: str, info: os.stat_result) -> bool:
    """Unlink ``name`` in ``parent`` if it is still the inode ``info`` describes."""
    try:
        now = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(now.st_mode):
        return False
    os.unlink(name, dir_fd=parent.fd)
    return True
