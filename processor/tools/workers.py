"""``processor run`` subprocesses, as the tools start them: their environment, and waiting
until the worker group answers."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from processor.client import Client
from processor.config import SETTINGS, Secret, Settings
from processor.errors import ProcessorError, ReplyTimeout

__all__ = ["settings_env", "wait_ready"]


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that makes ``processor run`` read ``settings``: ``base`` (default
    this process's environment) with every set setting as its variable, secrets revealed,
    and ``PROCESSOR_METRICS_PORT=0`` (N workers on one host: no port to collide on)."""
    env = dict(os.environ if base is None else base)
    for s in SETTINGS:
        value = getattr(settings, s.name)
        if value is not None:
            env[s.env] = value.reveal() if isinstance(value, Secret) else str(value)
    env["PROCESSOR_METRICS_PORT"] = "0"
    return env


async def wait_ready(
    client: Client, entity: str, record_id: int | str, limit: float, *, hint: str = ""
) -> None:
    """Until the worker group answers a retrieve of ``entity`` ``record_id`` (a fresh group
    takes a few seconds to be assigned its partitions); ProcessorError after ``limit`` s."""
    deadline = time.monotonic() + limit
    while True:
        try:
            await client.retrieve(entity, record_id, timeout=min(5.0, limit))
            return
        except ReplyTimeout:
            if time.monotonic() > deadline:
                raise ProcessorError(
                    f"no worker answered within {limit:g} s: is a worker group running on "
                    f"{client.request_topic!r}?{hint}"
                ) from None
