"""Publishes records to Kafka from the async API and awaits the broker's ack.

The API answers 202 only after the broker acknowledged the event (acks=all),
so an acknowledged event is in the log even if this process dies a moment
later. When the broker is unreachable the call fails fast with
``BrokerUnavailable`` (the API answers 503 + Retry-After and acknowledges
nothing); the client retries with the same event_id and consumers de-duplicate.
The event loop never blocks: librdkafka batches in its own threads and a
poll thread resolves futures through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from infra.kafka import producer_config
from serving.config import Settings
from serving.lag import PRODUCER, ProgressRecorder
from serving.metrics import PRODUCE_ERRORS

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """The broker did not acknowledge in time; nothing was acknowledged to the client."""


class EventPublisher:
    # After the broker was seen down, requests fail fast for this long before
    # the next attempt, instead of each waiting the whole produce timeout.
    DOWN_BACKOFF_S = 1.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer = Producer(producer_config(settings, error_cb=self._on_error))
        # Best-effort records (impressions, dead letters) get a producer of their own with a
        # long linger: one per served list, and a produce into a queue that is already
        # lingering skips the wake-up of librdkafka's thread (~55 -> ~21 us of CPU each here)
        # without delaying the acknowledged events above.
        # Nobody waits on their delivery: only failures come back to the poll thread.
        self._best_effort = Producer(producer_config(
            settings, error_cb=self._on_error, **{"linger.ms": settings.kafka.best_effort_linger_ms,
                                                  "delivery.report.only.error": True}))
        self._down_since: float | None = None
        self._last_error = ""
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="kafka-poll", daemon=True)
        self._poller.start()
        self.progress = ProgressRecorder(settings, PRODUCER).start()
        self.produced = 0
        self.failed = 0

    # -- state ----------------------------------------------------------------
    @property
    def broker_down(self) -> bool:
        return self._down_since is not None

    def _on_error(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("broker_down error=%s", error.str())
        self._last_error = error.str()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)
            self._best_effort.poll(0)

    # -- publishing -------------------------------------------------------------
    async def publish_many(self, topic: str, records: Sequence[tuple[str, bytes]]) -> None:
        """Produce (key, value) records and wait until the broker acknowledged all of them."""
        if self._down_since is not None and time.monotonic() - self._down_since < self.DOWN_BACKOFF_S:
            PRODUCE_ERRORS.labels(topic=topic).inc(len(records))
            raise BrokerUnavailable(f"broker unreachable: {self._last_error or 'no connection'}")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []

        progress = self.progress

        def make_callback(future: asyncio.Future[None]):  # type: ignore[no-untyped-def]
            def on_delivery(err: KafkaError | None, msg: Message) -> None:
                if err is None:  # the producing end of the flow-lag measurement (serving/lag.py)
                    progress.note(msg.topic(), msg.partition(), msg.offset(), time.time() * 1000)
                loop.call_soon_threadsafe(_resolve, future, err)

            return on_delivery

        for key, value in records:
            future: asyncio.Future[None] = loop.create_future()
            futures.append(future)
            try:
                self._producer.produce(topic, value=value, key=key.encode(), on_delivery=make_callback(future))
            except BufferError:
                self._producer.poll(0)
                self._producer.produce(topic, value=value, key=key.encode(), on_delivery=make_callback(future))
            except KafkaException as exc:
                self._cancel(futures)
                PRODUCE_ERRORS.labels(topic=topic).inc(len(records))
                raise BrokerUnavailable(str(exc)) from exc
        try:
            async with asyncio.timeout(self.settings.kafka.produce_timeout_s + 0.5):
                await asyncio.gather(*futures)
        except (TimeoutError, KafkaException) as exc:
            self.failed += len(records)
            PRODUCE_ERRORS.labels(topic=topic).inc(len(records))
            self._cancel(futures)
            if self._down_since is None:
                self._down_since = time.monotonic()
            raise BrokerUnavailable(f"broker did not acknowledge: {exc or 'timeout'}") from exc
        self.produced += len(records)
        self._down_since = None

    async def publish(self, topic: str, key: str, value: bytes) -> None:
        await self.publish_many(topic, [(key, value)])

    def publish_nowait(self, topic: str, key: str, value: bytes) -> None:
        """Fire-and-forget, for best-effort records (dead letters, impressions)."""
        try:
            self._best_effort.produce(topic, value=value, key=key.encode())
        except (BufferError, KafkaException) as exc:
            log.warning("publish_nowait_failed topic=%s error=%s", topic, exc)

    async def ping(self, timeout_s: float = 1.0) -> bool:
        """True if the broker answers a metadata request."""
        try:
            await asyncio.to_thread(self._producer.list_topics, timeout=timeout_s)
        except KafkaException:
            return False
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        self._producer.flush(timeout_s)
        self._best_effort.flush(timeout_s)
        self._stop.set()
        self._poller.join(timeout=1.0)
        self.progress.stop()

    @staticmethod
    def _cancel(futures: list[asyncio.Future[None]]) -> None:
        for future in futures:
            if not future.done():
                future.cancel()


def _resolve(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(KafkaException(err))
