"""Health: liveness counts known waits, readiness needs every condition; the probe endpoints say why."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from consumers.health import Health
from consumers.http_server import probe_ready, serve


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def serving(clock: Clock, **kw: object) -> Health:
    h = Health(clock=clock, **kw)  # type: ignore[arg-type]
    h.update(broker_ok=True, model_loaded=True, assigned=True)
    return h


def test_a_fresh_process_is_alive_but_not_ready() -> None:
    h = Health(clock=Clock())
    assert h.alive() and not h.ready()
    assert h.not_ready_reason() == "no model loaded"


def test_ready_needs_model_assignment_broker_and_a_turning_loop() -> None:
    clock = Clock()
    h = serving(clock)
    assert h.ready() and h.not_ready_reason() is None
    for field, reason in (("model_loaded", "no model loaded"), ("broker_ok", "broker not reachable"),
                          ("assigned", "no partition assigned")):
        setattr(h, field, False)
        assert not h.ready() and h.not_ready_reason() == reason
        setattr(h, field, True)
    clock.now += 31
    assert not h.ready() and h.not_ready_reason() == "main loop stalled for 31s"
    h.beat()
    assert h.ready()


def test_a_daemon_without_a_model_is_ready_without_one() -> None:
    h = Health(needs_model=False, clock=Clock())
    h.update(broker_ok=True, assigned=True)
    assert h.ready()


def test_a_stalled_loop_is_dead_unless_the_process_is_in_a_known_wait() -> None:
    clock = Clock()
    h = serving(clock)
    clock.now += 59
    assert h.alive()
    clock.now += 2
    assert not h.alive() and h.alive(stall_s=120)
    h.waiting_for = "broker"
    clock.now += 3600
    assert h.alive()
    assert not h.ready() and h.not_ready_reason() == "waiting for broker"


def test_leaving_a_long_wait_counts_as_a_turn() -> None:
    clock = Clock()
    h = serving(clock)
    h.waiting_for = "first model"
    clock.now += 3600
    h.waiting_for = None
    assert h.alive() and h.ready()


def test_follow_takes_assignment_and_loop_from_the_daemon() -> None:
    clock = Clock()
    daemon = SimpleNamespace(assigned=False, last_loop=clock.now)
    h = Health(clock=clock)
    h.update(broker_ok=True, model_loaded=True, assigned=True)
    h.follow(daemon)
    assert not h.assigned and h.not_ready_reason() == "no partition assigned"
    daemon.assigned = True
    assert h.ready()
    clock.now += 100
    assert not h.alive()
    daemon.last_loop = clock.now
    assert h.alive() and h.ready() and h.last_loop == clock.now


def test_update_refuses_unknown_fields() -> None:
    with pytest.raises(AttributeError):
        Health().update(brokr_ok=True)


def test_fields_set_from_many_threads_stay_consistent() -> None:
    h = Health()

    def flip(n: int) -> None:
        for i in range(2000):
            h.update(assigned=bool(i % 2), waiting_for=None if i % 3 else "broker")
            h.beat()
            h.snapshot()
            h.ready()

    threads = [threading.Thread(target=flip, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(h.snapshot()) == {"broker_ok", "model_loaded", "assigned", "loop_age_s", "waiting_for"}


# ---------------------------------------------------------------------- endpoints
@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def port(health: Health) -> Iterator[int]:
    server = serve(0, health=health, host="127.0.0.1")
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_probes_while_waiting_for_the_broker(health: Health, port: int) -> None:
    health.update(model_loaded=True, waiting_for="broker")
    assert get(port, "/healthz") == (200, "ok: waiting for broker\n")
    assert get(port, "/readyz") == (503, "not ready: waiting for broker\n")


def test_probes_when_serving(health: Health, port: int) -> None:
    health.update(model_loaded=True, broker_ok=True, assigned=True)
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ready\n")
    assert probe_ready(port)
    health.assigned = False
    assert get(port, "/readyz") == (503, "not ready: no partition assigned\n")
    assert not probe_ready(port)
    assert get(port, "/metrics")[0] == 200
    assert get(port, "/nope")[0] == 404


def test_probes_from_callables() -> None:
    state = {"alive": True, "ready": False}
    server = serve(0, alive=lambda: state["alive"], ready=lambda: state["ready"], host="127.0.0.1")
    try:
        p = server.server_address[1]
        assert get(p, "/healthz") == (200, "ok\n")
        assert get(p, "/readyz") == (503, "not ready\n")
        state.update(alive=False, ready=True)
        assert get(p, "/healthz") == (503, "stalled\n")
        assert get(p, "/readyz") == (200, "ready\n")
    finally:
        server.shutdown()
        server.server_close()


def test_probe_ready_is_false_where_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    assert not probe_ready(free, timeout_s=1.0)


def test_serve_takes_health_or_callables_not_both(health: Health) -> None:
    with pytest.raises(TypeError):
        serve(0, health=health, alive=lambda: True, ready=lambda: True)
    with pytest.raises(TypeError):
        serve(0, alive=lambda: True)
