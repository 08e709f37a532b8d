"""Measure how many replies each client instance reads: every partition (the old design)
against its own reply partitions (fixed, or claimed through a client group).

    KAFKA_BOOTSTRAP_SERVERS=... DATABASE_URL=... .venv/bin/python ops/reply_fanout.py \
        --clients 8 --requests 1000

Sets up its own topics (as many reply partitions as clients), schema, registry and ledger,
runs one `processor run` worker, then per mode starts ``--clients`` client processes that
wait at a barrier and then each send ``--requests`` updates (100 in flight) and report the
reply records they read. Everything it created is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from processor.client import Client
from processor.contract import UpdateRequest
from processor.kafka import clients as kafka

ROOT = Path(__file__).resolve().parent.parent
MODES = ("all", "fixed", "group")


async def _client(args: argparse.Namespace) -> None:
    routing: dict[str, Any] = {}
    if args.mode == "fixed":
        routing["reply_partitions"] = [args.index]
    elif args.mode == "group":
        routing["reply_group"] = f"fanout-{args.run}"
    async with Client(
        os.environ["KAFKA_BOOTSTRAP_SERVERS"],
        request_topic=f"fo-req-{args.run}",
        reply_topic=f"fo-rep-{args.run}",
        timeout=120,
        **routing,
    ) as client:
        print("ready", sorted(client.owned), flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the barrier: every client started
        before = client.replies_read
        started = time.monotonic()
        base = args.index * args.requests
        for chunk in range(0, args.requests, 100):
            await asyncio.gather(
                *(
                    client.send(
                        UpdateRequest(
                            request_id=f"{args.run}-{args.mode}-{base + n}",
                            entity="counter",
                            id=base + n,
                            attributes={"n": n},
                        )
                    )
                    for n in range(chunk, min(chunk + 100, args.requests))
                )
            )
        seconds = time.monotonic() - started
        # Replies of the others still arriving: read for a moment more, as a client would.
        await asyncio.sleep(2)
        print(
            json.dumps(
                {
                    "read": client.replies_read - before,
                    "own": args.requests,
                    "seconds": round(seconds, 2),
                    "partitions": sorted(client.owned),
                    "resent": client.resent,
                }
            ),
            flush=True,
        )


async def _setup(run: str, clients: int, tmp: Path) -> tuple[dict[str, str], str]:
    bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    database_url = os.environ["DATABASE_URL"]
    schema = f"fanout_{run}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            f"CREATE SCHEMA {schema}; "
            f"CREATE TABLE {schema}.counter (id integer PRIMARY KEY, n bigint NOT NULL DEFAULT 0);"
            f"INSERT INTO {schema}.counter (id) SELECT generate_series(0, 100000)"
        )
    finally:
        await conn.close()
    registry = tmp / "entities.toml"
    registry.write_text(f'[entities.counter]\ntable = "{schema}.counter"\nkey = "id"\n')
    access = kafka.KafkaAccess(bootstrap)
    await kafka.ensure_topics(access, [f"fo-req-{run}", f"fo-dlq-{run}"], partitions=4)
    await kafka.ensure_topics(access, [f"fo-rep-{run}"], partitions=clients)
    env = {
        **os.environ,
        "PROCESSOR_REQUEST_TOPIC": f"fo-req-{run}",
        "PROCESSOR_REPLY_TOPIC": f"fo-rep-{run}",
        "PROCESSOR_DLQ_TOPIC": f"fo-dlq-{run}",
        "PROCESSOR_GROUP_ID": f"fo-grp-{run}",
        "PROCESSOR_ENTITIES": str(registry),
        "PROCESSOR_LEDGER_SCHEMA": schema,
        "PROCESSOR_METRICS_PORT": "0",
    }
    subprocess.run([sys.executable, "-m", "processor", "migrate"], env=env, check=True)  # noqa: ASYNC221 (setup)
    return env, schema


async def _teardown(run: str, schema: str) -> None:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()
    admin = kafka.admin_client(kafka.KafkaAccess(os.environ["KAFKA_BOOTSTRAP_SERVERS"]))
    await admin.start()
    try:
        await admin.delete_topics([f"fo-req-{run}", f"fo-rep-{run}", f"fo-dlq-{run}"])
    finally:
        await admin.close()


def _mode(args: argparse.Namespace, run: str, mode: str) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                *("--mode", mode, "--run", run, "--index", str(i)),
                *("--requests", str(args.requests)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(args.clients)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            while not (line := p.stdout.readline()).startswith("ready"):  # past client logs
                if not line:
                    raise SystemExit(f"a {mode} client exited before it was ready")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            lines = out.strip().splitlines()  # the result, then maybe a rebalance's log
            results.append(json.loads(next(x for x in reversed(lines) if x.startswith("{"))))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


async def _main(args: argparse.Namespace) -> int:
    run = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp:
        env, schema = await _setup(run, args.clients, Path(tmp))
        worker = subprocess.Popen(  # noqa: ASYNC220 (runs for the whole measure)
            [sys.executable, "-m", "processor", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            print(f"{args.clients} client processes x {args.requests} updates, 1 worker\n")
            print(
                "| mode | replies read per client (min / mean / max) | own | all clients read |"
                " slowest client s | resent |"
            )
            print("|---|---|---|---|---|---|")
            for mode in args.modes:
                results = await asyncio.to_thread(_mode, args, run, mode)
                reads = [r["read"] for r in results]
                print(
                    f"| {mode} | {min(reads)} / {sum(reads) / len(reads):.0f} / {max(reads)} | "
                    f"{args.requests} | {sum(reads)} | {max(r['seconds'] for r in results)} | "
                    f"{sum(r['resent'] for r in results)} |",
                    flush=True,
                )
        finally:
            worker.terminate()
            worker.wait(timeout=60)
            await _teardown(run, schema)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client(args))
        return 0
    if args.clients < 1 or args.requests < 1 or set(args.modes) - set(MODES):
        parser.error(f"--clients and --requests must be >= 1, --modes from {MODES}")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
