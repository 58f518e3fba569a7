"""System metrics (CPU, memory, disk, network, GPU) for the tracker, from MLflow's own collectors."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("dist_free.tracking")


class SystemSampler:
    """MLflow's own system-metrics collectors (CPU, memory, disk, network, GPU), queued like
    every other metric. MLflow's SystemMetricsMonitor thread would log them itself, but it stops
    for good at its first failed request; through the queue they survive an outage.
    Step = whole seconds since the run started, so a resumed run continues the same axis.
    The sampling interval follows MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (MLflow's default: 10 s).
    `tracker` gets the samples (its log_metrics); `uri` is the run's tracking URI.
    """

    def __init__(self, tracker, uri: str, start_ms: int):
        self._tracker, self._start_ms = tracker, start_ms
        self._stop = threading.Event()
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id=None, tracking_uri=uri)
        except Exception as exc:  # noqa: BLE001 - psutil missing: tracking goes on without them
            log.warning("MLflow system metrics off (%s); install psutil (and nvidia-ml-py for "
                        "GPUs)", exc)
            self._thread = None
            return
        self._thread = threading.Thread(target=self._loop, name="mlflow-system-metrics",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        monitor, samples = self._monitor, 0
        while not self._stop.wait(float(monitor.sampling_interval)):
            try:
                monitor.collect_metrics()
                samples += 1
                if samples < int(monitor.samples_before_logging):
                    continue
                values = monitor.aggregate_metrics()
                for m in monitor.monitors:
                    m.clear_metrics()
            except Exception as exc:  # noqa: BLE001 - a flaky sensor must not end the run
                log.debug("system metrics sample failed: %s", exc)
                continue
            samples, now = 0, int(time.time() * 1000)
            self._tracker.log_metrics({f"system/{k}": v for k, v in values.items()},
                                      step=(now - self._start_ms) // 1000, timestamp_ms=now)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
