"""Processes seen through /proc (Linux): the one scan for a process's children."""

from __future__ import annotations

from pathlib import Path

__all__ = ["children", "proc_alive", "proc_stat"]


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_alive(pid: int) -> bool:
    """Running (a zombie is dead: nobody may have reaped it yet)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in {"Z", "X"}


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` right now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = proc_stat(int(entry.name))
        try:
            ppid = int(fields[1]) if fields else -1
        except ValueError:
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return found
