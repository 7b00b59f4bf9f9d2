"""Topic set-up: create what is missing, leave what exists alone.

The detector's state topic holds one snapshot per asset (key = asset) and is read back on a
hand-over: it is created compacted, with as many partitions as the readings topic.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.errors import AuthorizationError, KafkaError, TopicAlreadyExistsError, for_code

from consumers.kafka_clients import make_admin
from pipeline.settings import Settings

if TYPE_CHECKING:
    from consumers.health import Health

log = structlog.get_logger(__name__)

_TOPIC_READY_TIMEOUT_MS = 10_000
STATE_TOPIC_CONFIGS: Mapping[str, str] = {"cleanup.policy": "compact"}
# One start-up attempt gives up on an unreachable broker after this long (kafka-python's own
# default is 30 s), so that the first warning comes soon.
RETRY_BOOTSTRAP_TIMEOUT_MS = 5_000


def standard_topics(settings: Settings) -> dict[str, int]:
    """The plantwatch topics and their partition counts.

    The model announcements go through one partition so every detector sees them in order.
    """
    t = settings.topics
    topics = {t.readings: t.partitions, t.alerts: t.partitions, t.dlq_topic: t.partitions, t.models: 1,
              t.state_topic: t.partitions}
    if t.scores:
        topics[t.scores] = t.partitions
    return topics


def replication_factor(broker_count: int) -> int:
    """1 on a single broker, else up to 3 replicas."""
    return 1 if broker_count <= 1 else min(3, broker_count)


def topic_requests(settings: Settings, topics: Mapping[str, int], existing: Mapping[str, int],
                   replication: int) -> dict[str, dict[str, Any]]:
    """The ``create_topics`` request (kafka-python's dict form) for the topics not in ``existing``.

    ``existing`` maps the topics that exist to their partition counts. The state topic gets
    ``cleanup.policy=compact`` and the partition count of the readings topic: the one it has
    when it exists, else the one it is about to be created with, else ``topics.partitions``.
    """
    t = settings.topics
    request: dict[str, dict[str, Any]] = {}
    for name, parts in topics.items():
        if name in existing:
            continue
        spec: dict[str, Any] = {"num_partitions": parts, "replication_factor": replication}
        if name == t.state_topic:
            spec["num_partitions"] = state_partitions(settings, topics, existing)
            spec["configs"] = dict(STATE_TOPIC_CONFIGS)
        request[name] = spec
    return request


def state_partitions(settings: Settings, topics: Mapping[str, int], existing: Mapping[str, int]) -> int:
    """The state topic's partition count: the readings topic's as it exists, else as it is about to
    be created, else ``topics.partitions``."""
    t = settings.topics
    return existing.get(t.readings) or topics.get(t.readings) or t.partitions


def ensure_topics(settings: Settings, topics: Mapping[str, int], *,
                  bootstrap_timeout_ms: int | None = None) -> None:
    """Create the missing topics and wait until they have leaders.

    A topic created concurrently by another process counts as success. Existing topics are not
    changed (partitions cannot be removed, and not every broker can add them): a smaller
    partition count than asked for is logged, because it caps the number of useful consumers,
    and so is an existing state topic that is not compacted. See :func:`topic_requests` for
    what is created.
    """
    admin = _admin(settings, bootstrap_timeout_ms)
    try:
        t = settings.topics
        names = set(admin.list_topics())
        wanted = set(topics)
        if t.state_topic in topics:
            wanted.add(t.readings)  # its partition count sizes the state topic
        existing = _partition_counts(admin, sorted(wanted & names))
        _warn_on_fewer_partitions(existing, {n: p for n, p in topics.items() if n in existing and n != t.state_topic})
        if t.state_topic in existing and t.state_topic in topics:
            _check_state_topic(admin, t.state_topic, existing[t.state_topic], state_partitions(settings, topics, existing))
        if any(name not in existing for name in topics):
            rf = replication_factor(len(admin.describe_cluster()["brokers"]))
            request = topic_requests(settings, topics, existing, rf)
            _create(admin, request)
            admin.wait_for_topics(list(request), timeout_ms=_TOPIC_READY_TIMEOUT_MS)
    finally:
        admin.close()


def ensure_topics_retrying(settings: Settings, topics: Mapping[str, int], *, stop: threading.Event,
                           health: Health | None = None, first_delay_s: float = 0.5, max_delay_s: float = 15.0,
                           attempt: Callable[[], None] | None = None) -> bool:
    """:func:`ensure_topics`, retried with exponential backoff while the broker cannot be reached.

    For a daemon starting before (or without) its broker: retriable Kafka errors (no connection,
    timeouts) are logged once per attempt and retried after 0.5 s, 1 s, 2 s … up to
    ``max_delay_s``; other errors are raised. Returns ``True`` once the topics are set up,
    ``False`` when ``stop`` was set first. ``health`` shows ``waiting_for="broker"`` meanwhile.
    Meant for start-up: while an attempt runs, kafka-python's log lines (of any client in the
    process) are folded into the warning instead of printed.
    """
    run = attempt or (lambda: ensure_topics(settings, topics, bootstrap_timeout_ms=RETRY_BOOTSTRAP_TIMEOUT_MS))
    delay, n = first_delay_s, 0
    if health is not None:
        health.waiting_for = "broker"
    try:
        while not stop.is_set():
            n += 1
            client_errors: list[str] = []
            try:
                if not _run_unless_stopped(run, stop, client_errors):
                    break
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                if health is not None:
                    health.broker_ok = False
                error = str(exc) or type(exc).__name__
                cause = next((m for m in reversed(client_errors) if error not in m), None)
                log.warning("broker not reachable for topic set-up; retrying", attempt=n,
                            retry_in_s=delay, bootstrap_servers=settings.kafka.bootstrap_servers,
                            error=error, **({"cause": cause} if cause else {}))
                if stop.wait(delay):
                    break
                delay = min(delay * 2, max_delay_s)
                continue
            if health is not None:
                health.broker_ok = True
            if n > 1:
                log.info("broker reachable; topics set up", attempts=n)
            return True
        return False
    finally:
        if health is not None:
            health.waiting_for = None


def _run_unless_stopped(run: Callable[[], None], stop: threading.Event, client_errors: list[str]) -> bool:
    """``run()`` in a daemon thread, with kafka-python's log lines collected into ``client_errors``;
    ``True`` when it finished (its exception is raised here), ``False`` when ``stop`` was set first
    (the attempt is left to end on its own: a stop is not kept waiting for a bootstrap timeout)."""
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            with _client_errors() as collected:
                try:
                    run()
                finally:
                    client_errors.extend(collected)
        except BaseException as exc:  # handed to the waiting thread
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=attempt, name="topic-setup", daemon=True)
    worker.start()
    while worker.is_alive() and not stop.is_set():
        worker.join(0.05)
    if not outcome:
        return False
    if outcome[0] is not None:
        raise outcome[0]
    return True


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__()
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def _client_errors() -> Iterator[list[str]]:
    """Collect what kafka-python logs during one start-up attempt instead of printing it: several
    lines per refused connection would bury the one warning per attempt (which cites the last)."""
    kafka_log, errors = logging.getLogger("kafka"), []
    handler, propagate = _Collect(errors), kafka_log.propagate
    kafka_log.addHandler(handler)
    kafka_log.propagate = False
    try:
        yield errors
    finally:
        kafka_log.propagate = propagate
        kafka_log.removeHandler(handler)


def _admin(settings: Settings, bootstrap_timeout_ms: int | None) -> KafkaAdminClient:
    return make_admin(settings) if bootstrap_timeout_ms is None else \
        make_admin(settings, bootstrap_timeout_ms=bootstrap_timeout_ms)


def _partition_counts(admin: KafkaAdminClient, names: Collection[str]) -> dict[str, int]:
    if not names:
        return {}
    return {info["name"]: len(info.get("partitions") or []) for info in admin.describe_topics(list(names))}


def _create(admin: KafkaAdminClient, request: Mapping[str, Mapping[str, Any]]) -> None:
    """Create the topics; a topic whose configs the broker refuses is created again without them.

    Any lasting error other than a refused authorization counts as a refusal of the configs
    (brokers answer them with different codes); the second request shows whether it was one.
    """
    without_configs: dict[str, dict[str, Any]] = {}
    for name, error, message in _create_errors(admin, request):
        if request[name].get("configs") and not error.retriable and not issubclass(error, AuthorizationError):
            log.warning("the broker refused the topic configs; creating the topic without them",
                        topic=name, configs=request[name]["configs"], error=message)
            without_configs[name] = {k: v for k, v in request[name].items() if k != "configs"}
        else:
            raise error(f"cannot create topic {name!r}: {message}")
    if without_configs:
        for name, error, message in _create_errors(admin, without_configs):
            raise error(f"cannot create topic {name!r}: {message}")


def _create_errors(admin: KafkaAdminClient, request: Mapping[str, Mapping[str, Any]]
                   ) -> list[tuple[str, type[KafkaError], str]]:
    """Send one create request; the topics that failed, with their error class and message.
    A topic that already exists counts as created: another process won the race."""
    response = admin.create_topics({name: dict(spec) for name, spec in request.items()}, raise_errors=False)
    failed = []
    for result in response["topics"]:
        name, code = result["name"], result["error_code"]
        if code == 0:
            spec = request[name]
            log.info("topic created", topic=name, partitions=spec["num_partitions"],
                     replication=spec["replication_factor"],
                     **({"configs": spec["configs"]} if spec.get("configs") else {}))
        elif code != TopicAlreadyExistsError.errno:
            error = for_code(code)
            failed.append((name, error, result.get("error_message") or error.__name__))
    return failed


def _warn_on_fewer_partitions(existing: Mapping[str, int], wanted: Mapping[str, int]) -> None:
    for name, parts in wanted.items():
        if existing[name] < parts:
            log.warning("topic has fewer partitions than configured", topic=name, partitions=existing[name],
                        configured=parts)


def _check_state_topic(admin: KafkaAdminClient, topic: str, partitions: int, expected: int) -> None:
    """Warn about an existing state topic that is not sized like the readings topic or not compacted."""
    if partitions != expected:
        log.warning("state topic and readings topic have different partition counts",
                    topic=topic, partitions=partitions, readings_partitions=expected)
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
        policy = described["topic"][topic]["cleanup.policy"]["value"]
    except Exception as exc:  # not every broker describes topic configs: then nothing is known
        log.debug("cannot read the state topic's configs", topic=topic, error=str(exc))
        return
    if "compact" not in str(policy).split(","):
        log.warning("state topic is not compacted: its snapshots expire with retention instead of keeping "
                    "the latest per asset; set cleanup.policy=compact on it", topic=topic, cleanup_policy=policy)
