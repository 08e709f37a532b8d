"""One Kafka KRaft node: its jars, java command line, properties, start and stop."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ops.lib.stack.config import (
    CACHE,
    HOST,
    JAVA_HEAP,
    LOG4J2,
    POM,
    SCRAM_MECHANISMS,
    SCRAM_USER,
    Stack,
    StackError,
    locked,
    rel,
    say,
    settings_file,
)
from ops.lib.stack.procs import kafka_pid, wait_gone


def kafka_version() -> str:
    found = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", POM.read_text())
    if not found:
        raise StackError(f"{POM}: no <kafka.version> property")
    return found.group(1)


def java_cmd() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        where = f"at {java} (JAVA_HOME)" if java_home else "on PATH"
        raise StackError(
            f"java not found {where}: Kafka needs a JDK/JRE >= 17. "
            "Debian: apt-get install openjdk-17-jre-headless"
        )
    out = subprocess.run(
        [java, "-XshowSettings:properties", "-version"], capture_output=True, text=True
    )
    found = re.search(r"java\.specification\.version = (\d+)", out.stderr + out.stdout)
    if not found or int(found.group(1)) < 17:
        version = found.group(1) if found else "unknown"
        raise StackError(f"{java} is Java {version}: Kafka {kafka_version()} needs Java >= 17")
    return java


def kafka_libs(fetch: bool = True) -> Path:
    """The broker's jars, resolved once from Maven Central into .cache/ (pinned by the POM)."""
    version = kafka_version()
    libs = CACHE / "kafka" / version / "libs"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    stamp = libs / ".complete"
    if stamp.exists() and stamp.read_text().strip() == digest:
        return libs
    if not fetch:
        raise StackError(f"Kafka {version} jars are missing: run ops/bootstrap")
    with locked(libs.parent / ".lock"):
        if stamp.exists() and stamp.read_text().strip() == digest:
            return libs
        mvn = shutil.which("mvn")
        if not mvn:
            raise StackError(
                "mvn not found: Maven resolves the Kafka jars from Maven Central "
                "(Debian: apt-get install maven)"
            )
        tmp = libs.with_name("libs.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"downloading Kafka {version} jars from Maven Central into {rel(libs)} ...")
        started = time.monotonic()
        out = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(POM),
                f"-Dmaven.repo.local={CACHE / 'm2'}",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={tmp}",
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            raise StackError(
                f"mvn could not resolve the Kafka {version} jars:\n"
                + "\n".join((out.stdout + out.stderr).splitlines()[-30:])
            )
        (tmp / ".complete").write_text(digest + "\n")
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        jars = len(list(libs.glob("*.jar")))
        say(f"{jars} jars ready ({time.monotonic() - started:.1f}s)")
    return libs


#: What every node of the stack sets alike, single or in the cluster (in this order, so
#: the written files stay as they were).
BROKER_COMMON: Final = {
    "group.initial.rebalance.delay.ms": "0",
    # after a kill -9 the restarted node waits for its old incarnation's session to
    # expire before it can register again (default 9 s): shorter, for fault tests
    "broker.heartbeat.interval.ms": "1000",
    "broker.session.timeout.ms": "4000",
    # topics are created explicitly (`processor topics`, the tests)
    "auto.create.topics.enable": "false",
    "num.partitions": "1",
    "delete.topic.enable": "true",
    "num.network.threads": "2",
}


def server_properties(stack: Stack) -> str:
    settings = {
        # one KRaft node: broker and controller in one process
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{stack.controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{stack.kafka_port},CONTROLLER://{HOST}:{stack.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{stack.kafka_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(stack.kafka_data),
        # internal topics on one node: transactions and consumer groups need these
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        **BROKER_COMMON,
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
    }
    if stack.kafka_sasl_ssl_port is not None:
        settings.update(sasl_ssl_properties(stack))
    return settings_file(settings, "=")


def sasl_ssl_properties(stack: Stack) -> dict[str, str]:
    """The SASL_SSL listener: TLS from PEM files, SCRAM logins (KRaft keeps the credentials)."""
    assert stack.kafka_tls_dir is not None
    listener = "listener.name.sasl_ssl."
    jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    return {
        "listeners": (
            f"PLAINTEXT://{HOST}:{stack.kafka_port},CONTROLLER://{HOST}:{stack.controller_port},"
            f"SASL_SSL://{HOST}:{stack.kafka_sasl_ssl_port}"
        ),
        "advertised.listeners": (
            f"PLAINTEXT://{HOST}:{stack.kafka_port},SASL_SSL://{HOST}:{stack.kafka_sasl_ssl_port}"
        ),
        "listener.security.protocol.map": (
            "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL"
        ),
        f"{listener}sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS),
        **{f"{listener}{m.lower()}.sasl.jaas.config": jaas for m in SCRAM_MECHANISMS},
        f"{listener}ssl.keystore.type": "PEM",
        f"{listener}ssl.keystore.location": str(stack.tls_keystore),
        f"{listener}ssl.truststore.type": "PEM",
        f"{listener}ssl.truststore.location": str(stack.kafka_tls_dir / "ca.pem"),
        f"{listener}ssl.client.auth": stack.kafka_tls_client_auth,
        # the certificate must name 127.0.0.1: clients check host names (no opt-out here)
    }


def prepare_sasl_ssl(stack: Stack) -> list[str]:
    """The listener's PEM keystore (key + chain, 0600) and the SCRAM password; the
    ``kafka-storage format`` arguments that create the user (empty: none needed)."""
    assert stack.kafka_tls_dir is not None
    keystore = stack.tls_keystore
    keystore.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keystore.touch(mode=0o600)
    keystore.write_bytes(
        (stack.kafka_tls_dir / "server.key").read_bytes().rstrip(b"\n")
        + b"\n"
        + (stack.kafka_tls_dir / "server.pem").read_bytes()
    )
    if not stack.scram_password_file.exists():
        stack.scram_password_file.touch(mode=0o600)
        stack.scram_password_file.write_text(secrets.token_urlsafe(24) + "\n")
    password = stack.scram_password_file.read_text().strip()
    if (stack.kafka_data / "meta.properties").exists():
        if stack.scram_marker.exists():
            return []
        raise StackError(
            f"the Kafka storage in {stack.kafka_data} was formatted without the SCRAM user "
            f"{SCRAM_USER!r}: `ops/stack down`, remove that directory (its topics go with it), "
            "and `ops/stack up` again; or use another PROCESSOR_STACK_DIR"
        )
    # the password is briefly on this command line (a dev stack; KRaft has no other way
    # to create a user before the broker starts)
    return [
        arg
        for mechanism in SCRAM_MECHANISMS
        for arg in ("--add-scram", f"{mechanism}=[name={SCRAM_USER},password={password}]")
    ]


def new_cluster_id() -> str:
    """A KRaft cluster id: a url-safe base64 uuid that does not start with '-' (as Kafka's
    own Uuid.randomUuid(): tools take such a value for an option)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def start_kafka(
    stack: Stack, properties: str | None = None, heap: Sequence[str] = JAVA_HEAP
) -> None:
    """Start one broker; ``properties`` (a cluster node's) replace the single node's."""
    java = java_cmd()
    libs = kafka_libs()
    stack.kafka_dir.mkdir(parents=True, exist_ok=True)
    stack.logs.mkdir(parents=True, exist_ok=True)
    stack.server_properties.write_text(properties or server_properties(stack))
    classpath = f"{libs}/*"
    log_opts = [f"-Dlog4j2.configurationFile={LOG4J2}", f"-Dkafka.logs.dir={stack.logs}"]
    add_scram = prepare_sasl_ssl(stack) if stack.kafka_sasl_ssl_port is not None else []
    if not (stack.kafka_data / "meta.properties").exists():
        id_file = stack.kafka_dir / "cluster.id"
        if not id_file.exists():
            id_file.write_text(new_cluster_id() + "\n")
        cluster_id = id_file.read_text().strip()
        say(f"formatting Kafka storage {rel(stack.kafka_data)} (cluster id {cluster_id})")
        fmt = subprocess.run(
            [
                *(java, *log_opts, "-cp", classpath, "kafka.tools.StorageTool", "format"),
                *(f"--cluster-id={cluster_id}", "--config", str(stack.server_properties)),
                "--ignore-formatted",
                *add_scram,
            ],
            capture_output=True,
            text=True,
        )
        if fmt.returncode != 0:
            raise StackError(f"Kafka storage format failed:\n{fmt.stdout}{fmt.stderr}")
        if add_scram:
            stack.scram_marker.write_text(SCRAM_USER + "\n")
    say(f"starting Kafka {kafka_version()} on {stack.bootstrap}")
    with stack.kafka_out.open("ab") as out:
        proc = subprocess.Popen(
            [
                java,
                *heap,
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
                *log_opts,
                "-cp",
                classpath,
                "kafka.Kafka",
                str(stack.server_properties),
            ],
            cwd=stack.kafka_dir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not killed by the terminal's Ctrl-C
        )
    stack.kafka_pidfile.write_text(f"{proc.pid}\n")
    proc.returncode = 0  # it outlives us on purpose: no "still running" warning


def stop_kafka(stack: Stack, immediate: bool = False, timeout: float = 60) -> None:
    pid = kafka_pid(stack)
    if pid is None:
        return
    say(f"stopping Kafka (pid {pid}{', SIGKILL' if immediate else ''})")
    if not immediate:
        os.kill(pid, signal.SIGTERM)
    if immediate or not wait_gone([pid], timeout):
        if not immediate:
            say(f"Kafka did not stop in {timeout:.0f}s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        wait_gone([pid], 10)
    stack.kafka_pidfile.unlink(missing_ok=True)
