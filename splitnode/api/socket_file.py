"""The socket file's safety, before and while a server listens: a private folder, one server per
socket (an flock on `<socket>.lock` held from the stale check through listen, never followed
through a symlink), and a stale socket nobody answers on told apart from a live one."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from splitnode.api import protocol as p

log = logging.getLogger("splitnode.api")


def prepare_socket_dir(path: Path) -> None:
    """Creates the socket's folder 0700; refuses a folder another user owns or others may write to,
    where someone else could swap the socket for their own."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode passes through the umask
    st = folder.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"socket folder {folder} is not a directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"socket folder {folder} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise PermissionError(f"socket folder {folder} is writable by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); use a folder only you can write to")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def take_socket_lock(path: Path) -> int:
    """An flock on `<socket>.lock`, held for the server's life: only its holder may remove a stale
    socket, bind and listen, so two servers starting at once cannot both pass the stale check.
    Returns the lock's fd; raises SocketInUse where another server holds it."""
    lock = lock_path(path)
    while True:
        fd = _open_lock(lock, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise p.SocketInUse(_in_use(path)) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us unlinks the file as it lets go: a lock on that unlinked inode is no lock.
        if _same_file(lock, fd):
            return fd
        os.close(fd)


def _open_lock(lock: Path, flags: int) -> int:
    """O_NOFOLLOW: a symlink planted at the lock's path must not make the server create, open or
    lock its target (nor unlink it later); O_NONBLOCK: nor may a FIFO there hang it."""
    try:
        fd = os.open(lock, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileExistsError(f"{lock} is a symlink; not following it (remove it if it is not yours)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileExistsError(f"{lock} exists and is not a regular file; not touching it")
    return fd


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def release_socket_lock(path: Path, fd: int) -> None:
    """Unlinks the lock file only if it is still the one this fd holds."""
    if _same_file(lock_path(path), fd):
        with contextlib.suppress(FileNotFoundError):
            lock_path(path).unlink()
    os.close(fd)


def _in_use(path: Path) -> str:
    return f"a server is already listening at {path}; stop it first or choose another --socket"


def _lock_held(path: Path) -> bool:
    try:
        fd = _open_lock(lock_path(path), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def check_socket_free(path: Path, timeout: float = 1.0, *, remove_stale: bool = False) -> None:
    """Raises SocketInUse if a server answers at `path` or holds its lock. A socket nobody listens
    on is stale; it is removed only with `remove_stale`, which only the lock's holder may pass: a
    server between bind() and listen() refuses connections too."""
    if not remove_stale and _lock_held(path):
        raise p.SocketInUse(_in_use(path))
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; not touching it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        if remove_stale:
            log.info("removing stale socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return
    except asyncio.TimeoutError:
        raise p.SocketInUse(f"something holds {path} but does not accept connections; not taking it over") from None
    writer.close()
    raise p.SocketInUse(_in_use(path))
