"""The services beside the control plane: Kafka (KRaft), PostgreSQL, Prometheus, and
kwok for simulated nodes. Each binds to loopback on free ports, logs to a file, and
is started on first use by DevCluster."""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleetward.devcluster.layout import Binaries
from fleetward.devcluster.poddiscovery import PodDiscovery
from fleetward.devcluster.process import ComponentFailed, ManagedProcess, free_port, port_open, run_checked


@dataclass
class Service:
    """A process the cluster starts on first use; subclasses set `proc` in start()."""

    state: Path
    bins: Binaries
    proc: ManagedProcess | None = field(default=None, init=False, repr=False)

    def start(self) -> Service:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Variables that tell clients how to reach the service."""
        return {}

    def check(self) -> None:
        if self.proc:
            self.proc.check()

    def stop(self) -> None:
        if self.proc:
            self.proc.stop(timeout=20)


# -- Kafka ------------------------------------------------------------------------------------

KAFKA_ADMIN = "admin"
LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = warn
logger.org.name = org.apache.kafka
logger.org.level = warn
"""


def kafka_cluster_id() -> str:
    """A KRaft cluster id: URL-safe base64 of a random UUID, never starting with '-'
    (the storage tool's argument parser would take it for an option; Kafka's own
    Uuid.randomUuid() avoids such ids for the same reason)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class Kafka(Service):
    """One Kafka broker+controller in KRaft mode.

    plain: PLAINTEXT listener, no authorizer (the default backbone for tests and `make up`).
    scram: SASL_PLAINTEXT with SCRAM-SHA-512 and the StandardAuthorizer; only `admin`
    is a super user, so a principal without ACLs is denied. The controller listener
    authenticates with SASL/PLAIN (SCRAM credentials live in the metadata log, which
    the controller must read before it can check them).
    """

    mode: str = "plain"  # or "scram"
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    @property
    def name(self) -> str:
        return "kafka" if self.mode == "plain" else "kafka-scram"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_config(self, username: str | None = None, password: str | None = None) -> dict[str, Any]:
        """confluent-kafka/librdkafka settings for this broker (admin when no user is given)."""
        cfg: dict[str, Any] = {"bootstrap.servers": self.bootstrap}
        if self.mode == "scram":
            cfg.update(
                {
                    "security.protocol": "SASL_PLAINTEXT",
                    "sasl.mechanism": "SCRAM-SHA-512",
                    "sasl.username": username or KAFKA_ADMIN,
                    "sasl.password": password if username else self.admin_password,
                }
            )
        return cfg

    def properties(self, data: Path) -> str:
        common = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "log.dirs": str(data),
            "num.partitions": "3",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
        }
        if self.mode == "plain":
            common.update(
                {
                    "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                    "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
                    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    "inter.broker.listener.name": "PLAINTEXT",
                }
            )
        else:
            pw = self.admin_password
            common.update(
                {
                    "listeners": f"SASL_PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                    "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{self.port}",
                    "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
                    "inter.broker.listener.name": "SASL_PLAINTEXT",
                    "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                    "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
                    "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": (
                        "org.apache.kafka.common.security.scram.ScramLoginModule required "
                        f'username="{KAFKA_ADMIN}" password="{pw}";'
                    ),
                    "sasl.mechanism.controller.protocol": "PLAIN",
                    "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
                    "listener.name.controller.plain.sasl.jaas.config": (
                        "org.apache.kafka.common.security.plain.PlainLoginModule required "
                        f'username="{KAFKA_ADMIN}" password="{pw}" user_{KAFKA_ADMIN}="{pw}";'
                    ),
                    "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                    "super.users": f"User:{KAFKA_ADMIN}",
                    "allow.everyone.if.no.acl.found": "false",
                }
            )
        return "".join(f"{k}={v}\n" for k, v in common.items())

    def _java(self, main_class: str, *args: str, heap: str = "512m") -> list[str]:
        return [
            "java",
            f"-Xmx{heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp",
            f"{self.bins.kafka_libs}/*",
            main_class,
            *args,
        ]

    @property
    def home(self) -> Path:
        return self.state / self.name

    def start(self) -> Kafka:
        if shutil.which("java") is None:
            raise ComponentFailed("kafka: java not found (Kafka needs Java 17+)")
        self.home.mkdir(parents=True, exist_ok=True)
        data = self.home / "data"
        (self.home / "log4j2.properties").write_text(LOG4J2)
        props = self.home / "server.properties"
        props.write_text(self.properties(data))
        props.chmod(0o600)
        fmt = ["format", "--cluster-id", kafka_cluster_id(), "--config", str(props), "--ignore-formatted"]
        if self.mode == "scram":
            fmt += ["--add-scram", f"SCRAM-SHA-512=[name={KAFKA_ADMIN},password={self.admin_password}]"]
        run_checked(
            f"{self.name} storage format",
            self._java("kafka.tools.StorageTool", *fmt, heap="256m"),
            self.state / "logs" / f"{self.name}-format.log",
        )
        self.proc = ManagedProcess(
            self.name, self._java("kafka.Kafka", str(props)), self.state / "logs" / f"{self.name}.log"
        ).start()
        self.proc.wait_ready(self._ready, 120)
        return self

    def _ready(self) -> bool:
        if not port_open("127.0.0.1", self.port):  # no client (and no client log noise) before that
            return False
        return bool(self.admin().list_topics(timeout=2).brokers)

    def admin(self):
        from confluent_kafka.admin import AdminClient

        return AdminClient(self.client_config())

    def create_user(self, username: str, password: str) -> None:
        """SCRAM mode: create (or reset) a SCRAM-SHA-512 user."""
        from confluent_kafka.admin import ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

        if self.mode != "scram":
            raise ValueError("users exist only in scram mode")
        upsert = UserScramCredentialUpsertion(
            username, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096), password.encode()
        )
        admin = self.admin()  # keep the client alive until its futures resolve
        for fut in admin.alter_user_scram_credentials([upsert]).values():
            fut.result(30)

    def create_topics(self, *names: str, partitions: int = 3) -> None:
        """Create topics; ones that exist already are fine."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import NewTopic

        admin = self.admin()  # keep the client alive until its futures resolve
        for fut in admin.create_topics([NewTopic(n, partitions, 1) for n in names]).values():
            try:
                fut.result(30)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    def env(self) -> dict[str, str]:
        if self.mode == "plain":
            return {"KAFKA_BOOTSTRAP": self.bootstrap}
        return {
            "KAFKA_SCRAM_BOOTSTRAP": self.bootstrap,
            "KAFKA_SCRAM_ADMIN_USER": KAFKA_ADMIN,
            "KAFKA_SCRAM_ADMIN_PASSWORD": self.admin_password,
        }


# -- PostgreSQL ---------------------------------------------------------------------------------


@dataclass
class Postgres(Service):
    """A PostgreSQL server from the Debian package, TCP on loopback only, password auth.

    PostgreSQL refuses to run as root; as root it runs as the package's `postgres` user."""

    port: int = field(default_factory=free_port)
    user: str = "fleetward"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    database: str = "fleetward"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> Postgres:
        home = self.state / "postgres"
        data = home / "data"
        home.mkdir(parents=True, exist_ok=True)
        run_as = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as e:
                raise ComponentFailed(
                    "postgres: running as root needs the `postgres` user "
                    "(created by the Debian postgresql package; run hack/install-debian.sh)"
                ) from e
            run_as = "postgres"
            os.chown(home, pw.pw_uid, pw.pw_gid)
            probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(home)])
            if probe.returncode != 0:
                raise ComponentFailed(
                    f"postgres: user `postgres` cannot write {home}; a parent folder is not "
                    "searchable by other users (move the checkout or set FLEETWARD_STATE)"
                )
        pwfile = home / "pwfile"
        pwfile.write_text(self.password + "\n")
        if run_as:
            shutil.chown(pwfile, run_as)
        pwfile.chmod(0o600)
        run_checked(
            "postgres initdb",
            [
                self.bins.postgres_bin / "initdb",
                "-D",
                data,
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
            self.state / "logs" / "postgres-initdb.log",
            user=run_as,
        )
        pwfile.unlink()
        self.proc = ManagedProcess(
            "postgres",
            [
                self.bins.postgres_bin / "postgres",
                "-D",
                data,
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-c",
                "unix_socket_directories=",
                "-c",
                "listen_addresses=127.0.0.1",
                # Test data: durability is not wanted, speed is.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            self.state / "logs" / "postgres.log",
            user=run_as,
            stop_signal=signal.SIGINT,  # "fast" shutdown
        ).start()
        self.proc.wait_ready(self._ready_admin, 60)
        import psycopg

        with psycopg.connect(self._dsn_db("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        return self

    def _dsn_db(self, db: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def _ready_admin(self) -> bool:
        import psycopg

        with psycopg.connect(self._dsn_db("postgres"), connect_timeout=2) as conn:
            return conn.execute("select 1").fetchone() == (1,)

    def env(self) -> dict[str, str]:
        return {"POSTGRES_DSN": self.dsn}


# -- Prometheus ----------------------------------------------------------------------------------


@dataclass
class Prometheus(Service):
    """Prometheus from the Debian package.

    Scrape targets: with a kubeconfig, every pod annotated `prometheus.io/scrape: "true"`
    (port and path from `prometheus.io/port|path`), found through the API server as in a
    real cluster (job `kubernetes-pods`, labels `namespace`, `pod`, `app`; fed by
    poddiscovery.py, since Debian's build lacks the Kubernetes discovery); and whatever a
    test adds (`add_target`, job `fleetward`). Both are file_sd files, which Prometheus
    re-reads on its own: no restart, no reload. `rule_files` are evaluated (alerts at
    /alerts)."""

    port: int = field(default_factory=free_port)
    scrape_interval: str = "2s"
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    kubeconfig: Path | None = None
    rule_files: tuple[Path, ...] = ()
    pods: PodDiscovery | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def home(self) -> Path:
        return self.state / "prometheus"

    def start(self) -> Prometheus:
        self.home.mkdir(parents=True, exist_ok=True)
        self._write_targets()
        scrape_configs: list[dict[str, Any]] = [
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{self.port}"]}]},
            {
                "job_name": "fleetward",
                "file_sd_configs": [{"files": [str(self.home / "targets.json")], "refresh_interval": "1s"}],
            },
        ]
        if self.kubeconfig is not None:
            pods_file = self.home / "pods.json"
            self.pods = PodDiscovery(self.kubeconfig, pods_file, skip_network=KWOK_POD_CIDR).start()
            scrape_configs.append(
                {
                    "job_name": "kubernetes-pods",
                    "file_sd_configs": [{"files": [str(pods_file)], "refresh_interval": "1s"}],
                }
            )
        config: dict[str, Any] = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": scrape_configs,
        }
        if self.rule_files:
            config["rule_files"] = [str(path) for path in self.rule_files]
        (self.home / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc = ManagedProcess(
            "prometheus",
            [
                self.bins.prometheus,
                f"--config.file={self.home / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.home / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d",
            ],
            self.state / "logs" / "prometheus.log",
        ).start()
        self.proc.wait_ready(lambda: urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200, 60)
        return self

    def _write_targets(self) -> None:
        groups = [{"targets": [t], "labels": labels} for t, labels in sorted(self.targets.items())]
        tmp = self.home / "targets.json.tmp"
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self.home / "targets.json")

    def stop(self) -> None:
        if self.pods is not None:
            self.pods.stop()
        super().stop()

    def add_target(self, address: str, **labels: str) -> None:
        """Scrape http://address/metrics from now on (label `job` defaults to fleetward)."""
        self.targets[address] = labels
        self._write_targets()

    def query(self, promql: str) -> list[dict[str, Any]]:
        from urllib.parse import urlencode

        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urlencode({'query': promql})}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query failed: {body}")
        return body["data"]["result"]

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range query (what a dashboard's graph asks for); start/end in Unix seconds."""
        from urllib.parse import urlencode

        params = urlencode({"query": promql, "start": start, "end": end, "step": step})
        with urllib.request.urlopen(f"{self.url}/api/v1/query_range?{params}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query failed: {body}")
        return body["data"]["result"]

    def knows_metric(self, name: str) -> bool:
        """Whether a scraped target exposed the metric family (its HELP/TYPE), with samples
        or not. Families drop a counter's _total (OpenMetrics) and a histogram's suffixes."""
        family = name
        for suffix in ("_bucket", "_count", "_sum", "_total"):
            family = family.removesuffix(suffix)
        for candidate in dict.fromkeys([name, family]):
            with urllib.request.urlopen(f"{self.url}/api/v1/metadata?metric={candidate}", timeout=10) as r:
                if json.load(r)["data"]:
                    return True
        return False

    def env(self) -> dict[str, str]:
        return {"PROMETHEUS_URL": self.url}


# -- kwok -------------------------------------------------------------------------------------------

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_POD_CIDR = "198.18.0.0/15"
KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}


@dataclass
class Kwok(Service):
    """kwok controller managing simulated nodes (for scale tests). Only nodes annotated
    `kwok.x-k8s.io/node: fake` are its; they are tainted so that only pods tolerating the
    taint land there. Simulated pod IPs come from 198.18.0.0/15, the range RFC 2544 sets
    aside for benchmarks: never routed on the Internet, and nothing here connects to a
    simulated pod. Not loopback, which they were until 2026-12-07: the API server refuses
    loopback addresses in Endpoints and EndpointSlices (422), so every Service selecting
    simulated pods (an Agent's metrics Service) had its endpoints controllers retrying
    refused writes, 5 per Agent in the operator bench, work a real cluster never does."""

    kubeconfig: Path
    port: int = field(default_factory=free_port)
    node_lease_seconds: int = 40  # see --node-lease-duration-seconds in start()

    def start(self) -> Kwok:
        self.proc = ManagedProcess(
            "kwok",
            [
                self.bins.kwok,
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                f"--cidr={KWOK_POD_CIDR}",
                "--node-ip=127.63.0.1",
                f"--server-address=127.0.0.1:{self.port}",
                # Heartbeats through node Leases, renewed every duration/4 = 10 s (kwokctl's default;
                # the kubelet's is the same 40 s). kwok's own default, 0, keeps no Lease at all, and the
                # heartbeat-with-lease stage below refreshes node status only every 10-20 min, so the
                # node controller saw no heartbeat for its 50 s grace period, marked every kwok node
                # NotReady and its pods NotReady, and kwok never readies a Running pod again.
                f"--node-lease-duration-seconds={self.node_lease_seconds}",
                *[f"--config={f}" for f in sorted((self.bins.kwok.parent / "stages").glob("*.yaml"))],
            ],
            self.state / "logs" / "kwok.log",
        ).start()
        healthz = f"http://127.0.0.1:{self.port}/healthz"
        self.proc.wait_ready(lambda: urllib.request.urlopen(healthz, timeout=2).status == 200, 60)
        return self

    @staticmethod
    def node_manifest(name: str, cpu: str = "32", memory: str = "256Gi", pods: str = "110") -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_ANNOTATION: "fake"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "type": "kwok",
                    "fleetward.dev/node-type": "kwok",
                },
            },
            "spec": {"taints": [KWOK_TAINT]},
            "status": {
                "allocatable": {"cpu": cpu, "memory": memory, "pods": pods},
                "capacity": {"cpu": cpu, "memory": memory, "pods": pods},
            },
        }
