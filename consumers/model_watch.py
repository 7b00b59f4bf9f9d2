"""Noticing, loading and warming new model versions beside the one being served.

A background thread learns of a new current version from the control topic (any message
there triggers a registry check) or, as a fallback, by polling the registry. It loads and
verifies the bundle, sets its weights into an idle inference network of the same shape
(kept from the previous swap, so repeated swaps build no new graphs), warms it, and offers
it to the detector, which swaps between two polls. A bundle that fails to load or verify
is refused, logged and counted; the old model keeps serving and the version is not retried (a
version the registry cannot find or a store that does not answer is tried again at the next check).
A prepared version the registry no longer names current when the swap is due (rolled back
meanwhile) is withdrawn, not swapped in.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from kafka import TopicPartition

from consumers import metrics
from consumers.kafka_clients import make_consumer
from pipeline.bundle import BundleError, ModelBundle
from pipeline.logs import get_logger
from pipeline.model import StepFunction
from pipeline.registry import RegistryError, current_version, load_version
from pipeline.settings import Settings


@dataclass
class PreparedModel:
    bundle: ModelBundle
    model: StepFunction
    prepare_s: float


class ModelWatcher:
    """Prepares new versions in a background thread; the detector takes them with :meth:`ready`."""

    def __init__(self, settings: Settings, serving: ModelBundle) -> None:
        self.settings = settings
        self.serving_version = serving.version
        self.taken: str | None = None  # version handed to the detector, not yet serving
        self.features = serving.features
        self.log = get_logger("plantwatch.models")
        self._idle: dict[tuple[int, tuple[int, ...]], StepFunction] = {}
        self._offer: queue.Queue[PreparedModel] = queue.Queue(maxsize=1)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.refused: set[str] = set()
        self._unreadable: dict[str, str] = {}  # version → the last error that kept it from loading
        self.current: str | None = None  # what the registry named current at its last check
        self._thread = threading.Thread(target=self._run, name="model-watch", daemon=True)

    def start(self) -> ModelWatcher:
        self._thread.start()
        threading.Thread(target=self._follow_control_topic, name="model-announcements", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def check_now(self) -> None:
        self._wake.set()

    def ready(self) -> PreparedModel | None:
        """A prepared model, if one is waiting and still current (never blocks)."""
        try:
            prepared = self._offer.get_nowait()
        except queue.Empty:
            return None
        self.taken = prepared.bundle.version  # being warmed up by the detector: not prepared again
        if self.superseded(prepared):
            self.withdraw(prepared)
            return None
        return prepared

    def superseded(self, prepared: PreparedModel) -> bool:
        """The registry has named another version current since ``prepared`` was (a rollback)."""
        return self.current is not None and self.current != prepared.bundle.version

    def withdraw(self, prepared: PreparedModel) -> None:
        """``prepared`` will not be swapped in; its network becomes the idle spare."""
        self.log.info("prepared model no longer current; not swapped in", version=prepared.bundle.version,
                      current=self.current, serving=self.serving_version)
        self.taken = None
        self._keep_spare(prepared.model)
        self._wake.set()

    def swapped(self, prepared: PreparedModel, previous_model: StepFunction) -> None:
        """The detector now serves ``prepared``; the previous network becomes the idle spare."""
        self.serving_version = prepared.bundle.version
        self.taken = None
        self._keep_spare(previous_model)
        self._wake.set()

    def _keep_spare(self, model: StepFunction) -> None:
        """An idle network, reused by the next version of its shape (no new graphs built)."""
        self._idle[(model.n_features, tuple(model.units))] = model

    def _run(self) -> None:
        interval = self.settings.detector.registry_poll_s
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.check()
            except Exception as exc:  # the thread must outlive one bad check, or no later model is taken
                self.log.error("model check failed; tried again at the next one", error=repr(exc),
                               serving=self.serving_version)

    def check(self) -> None:
        """Read which version the registry names current; prepare it if it is new and nothing waits."""
        try:
            version = current_version(self.settings.registry.uri)
        except (RegistryError, OSError) as exc:
            self.log.warning("registry unreadable", error=str(exc))
            return
        self.current = version
        if not self._offer.empty() or version is None or version in (self.serving_version, self.taken) \
                or version in self.refused:
            return
        self._prepare(version)

    def _prepare(self, version: str) -> None:
        t = time.perf_counter()
        try:
            bundle = load_version(self.settings.registry.uri, version, expected_features=self.features)
            model = self._network_for(bundle)
        except (OSError, RegistryError) as exc:
            # The store did not answer, or the version is not (yet) there: a pointer read before its
            # directory is visible, a pin racing a prune. It may be fine: tried again next time (and
            # logged again only when the error changes: a registry left so is checked every interval).
            if self._unreadable.get(version) != str(exc):
                self.log.warning("model unreadable for now; the current one keeps serving", version=version,
                                 error=str(exc), serving=self.serving_version)
            self._unreadable[version] = str(exc)
            return
        except Exception as exc:  # a defective bundle (BundleError), or one the network cannot take
            self.refused.add(version)
            metrics.MODEL_SWAPS.labels("refused").inc()
            self.log.error("model refused; the current one keeps serving", version=version,
                           error=str(exc) if isinstance(exc, BundleError) else repr(exc), serving=self.serving_version)
            return
        prepared = PreparedModel(bundle, model, time.perf_counter() - t)
        self.log.info("model prepared", version=version, prepare_s=round(prepared.prepare_s, 3))
        self._offer.put(prepared)

    def _network_for(self, bundle: ModelBundle) -> StepFunction:
        """An inference network holding the bundle's weights, warmed: the idle one of its shape if any."""
        shape = (bundle.n_features, tuple(bundle.units))
        model = self._idle.pop(shape, None)
        if model is None:
            model = StepFunction(bundle.n_features, bundle.units, bundle.weights)
        else:
            model.set_weights(bundle.weights)
        model.warm_up()
        return model

    def _follow_control_topic(self) -> None:
        """Any announcement on the models topic triggers an immediate registry check."""
        topic = self.settings.topics.models
        try:
            consumer = make_consumer(self.settings, group_id=None)
        except Exception as exc:  # the registry poll still works without the control topic
            self.log.warning("control topic unavailable; polling the registry only", error=str(exc))
            return
        try:
            parts = consumer.partitions_for_topic(topic) or {0}
            consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
            while not self._stop.is_set():
                if any(consumer.poll(timeout_ms=500).values()):
                    self._wake.set()
        finally:
            consumer.close()
