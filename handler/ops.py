"""Operations, the same for every mode: one log line per item (JSON with SUPERRES_LOG_FORMAT=json), Prometheus
metrics in a registry of our own, and, in the long-running modes, a small HTTP server with /metrics and /healthz.

Metrics (the names as scraped):
  superres_items_total{outcome}                     items settled: done | duplicate | failed | skipped | retry | lost-claim
  superres_stage_seconds{stage}                     histogram: read | decode | upscale | encode | publish
  superres_engine_output_megapixels_per_second      the last upscaled item's output Mpx / its upscale seconds
  superres_items_in_flight                          items submitted to the stage runner and not settled yet (up to
                                                    SUPERRES_IN_FLIGHT in watch, worker and Lambda)
  superres_engine_info{engine,device,model}         1, the labels say what runs
  superres_engine_healthy                           1; 0 once the process was told the engine is broken
                                                    (/healthz then answers 503 with the reason)
`superres serve` adds (HttpMetrics), on its own port beside the API:
  superres_http_requests_total{endpoint,status}     requests answered, by route (its template) and status code
  superres_http_request_seconds{endpoint,status}    histogram: from the request's start to its response's end
  superres_queue_pending                            items submitted and not settled yet (waiting or in work)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager

from pipeline.process import Result

log = logging.getLogger("superres")

OUTCOMES = ("done", "duplicate", "failed", "skipped", "retry", "lost-claim")
STAGES = ("read", "decode", "upscale", "encode", "publish")
# 1 ms (a duplicate's read) to 10 min (EDSR x4 on a CPU, a big image): roughly x2.5 steps
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def engine_labels(processor) -> dict[str, str]:
    """What runs, for log lines, the info metric and /healthz."""
    return {"engine": processor.engine.name, "device": processor.engine.device, "model": processor.spec.name}


def log_result(result: Result, engine: dict[str, str]) -> None:
    """The one line per item, in every mode. Every stage key is always there (null: not reached), so a log
    pipeline sees one shape; total_s is the sum of the timed stages."""
    seconds = result.seconds
    stages = {f"{stage}_s": round(seconds[stage], 4) if stage in seconds else None for stage in STAGES}
    log.info("item", extra={"fields": {
        "source": result.source.id, "sha256": result.sha256, "outcome": result.outcome,
        "output": result.output or "", "detail": result.detail,
        **stages, "total_s": round(sum(seconds.values()), 4), **engine,
    }})


# 5 ms (a status look-up) to 10 min (an upscale answered in the request, or a job's event stream)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class HttpMetrics:
    """Requests by endpoint and status, in the process's registry (serve makes it before the engine is loaded,
    so the probes of the start are counted too; Ops joins the same registry once it is)."""

    def __init__(self, registry: CollectorRegistry, pending=lambda: 0):
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("superres_http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.seconds = Histogram("superres_http_request_seconds", "Seconds per HTTP request, by endpoint and status",
                                 ["endpoint", "status"], buckets=HTTP_BUCKETS, registry=registry)
        Gauge("superres_queue_pending", "Items submitted and not settled yet", registry=registry).set_function(pending)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.seconds.labels(endpoint, str(status)).observe(seconds)


class Ops:
    """One per process: the metrics, the engine's labels, and the main loop's heartbeat for /healthz."""

    def __init__(self, engine: dict[str, str], *, interval_s: float = 0.0, registry: CollectorRegistry | None = None):
        self.engine = engine
        # prometheus_client is imported where metrics are made: `superres upscale` never loads it
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = registry or CollectorRegistry()  # our own: no process/platform collectors, no globals
        r = self.registry
        self.items = Counter("superres_items", "Items settled, by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:  # every series present from the start, so rate() sees the first one
            self.items.labels(outcome)
        self.stage_seconds = Histogram("superres_stage_seconds", "Seconds per pipeline stage of an item", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=r)
        self.mpx_per_s = Gauge("superres_engine_output_megapixels_per_second",
                               "Output megapixels per upscale second of the last upscaled item", registry=r)
        self.in_flight_items = Gauge("superres_items_in_flight", "Items being processed now", registry=r)
        Info("superres_engine", "The engine, device and model in use", registry=r).info(engine)
        self.engine_healthy = Gauge("superres_engine_healthy", "1 while the engine works, 0 once it failed",
                                    registry=r)
        self.engine_healthy.set(1)
        self._engine_failure: str | None = None
        # /healthz: stale when the loop has not beaten for 2x the longest of its own wait and 60 s. The loop
        # beats every iteration and around each item, so this is also the longest one item may take before
        # the probe says 503: generous for every model but EDSR on a CPU, where a probe wants more slack.
        self.stale_after_s = 2 * max(interval_s, 60.0)
        self._busy = 0
        self._beat = time.monotonic()
        self._last_item: float | None = None

    @classmethod
    def for_processor(cls, processor, *, interval_s: float = 0.0) -> "Ops":
        return cls(engine_labels(processor), interval_s=interval_s)

    def observe(self, result: Result) -> None:
        self.items.labels(result.outcome).inc()
        for stage, seconds in result.seconds.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(seconds)
        upscale_s = result.seconds.get("upscale")
        if result.outcome == "done" and upscale_s and result.output_pixels:
            self.mpx_per_s.set(result.output_pixels / 1e6 / upscale_s)

    def record(self, result: Result, *, log_line: bool = True) -> None:
        """Count it, and log its line (S3 watch keeps already-settled objects out of the log: a restart on a
        big bucket would otherwise print one line per object)."""
        self.observe(result)
        if log_line:
            log_result(result, self.engine)

    @contextmanager
    def in_flight(self):
        self.heartbeat()  # the item's time counts from its start, not from the last idle beat
        self.in_flight_items.inc()
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self.in_flight_items.dec()
            self._last_item = self.heartbeat()

    def engine_failed(self, reason: str) -> None:
        """The engine cannot work any more (a lost GPU, a dead runtime): /healthz says 503 from now on, so the
        orchestrator replaces the process instead of feeding it items that would all fail. It stays failed."""
        self._engine_failure = reason
        self.engine_healthy.set(0)
        log.error("engine failed", extra={"fields": {"reason": reason, **self.engine}})

    def heartbeat(self) -> float:
        self._beat = time.monotonic()
        return self._beat

    def health(self) -> tuple[int, dict]:
        now = time.monotonic()
        # The loop beats between items only. An item in work is not a stall: one EDSR image on a CPU can take
        # minutes, and a probe that killed the process mid-item would only make it start that item again.
        busy = self._busy > 0
        stale = not busy and now - self._beat > self.stale_after_s
        failed = self._engine_failure is not None
        doc = {"status": "engine_failed" if failed else "stalled" if stale else "ok", **self.engine,
               "last_item_age_s": None if self._last_item is None else round(now - self._last_item, 1),
               "last_beat_age_s": round(now - self._beat, 1), "in_flight": busy}
        if failed:
            doc["reason"] = self._engine_failure
        return (503 if stale or failed else 200), doc

    def wsgi_app(self):
        from prometheus_client import make_wsgi_app

        metrics = make_wsgi_app(self.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "/")
            if path == "/healthz":
                code, doc = self.health()
                body = json.dumps(doc).encode()
                start_response("200 OK" if code == 200 else "503 Service Unavailable",
                               [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
                return [body]
            if path in ("/metrics", "/"):
                return metrics(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: /metrics, /healthz\n"]

        return app

    def serve(self, port: int, host: str = "127.0.0.1") -> WSGIServer | None:
        """Serve /metrics and /healthz on host:port from a daemon thread (it never holds up exit).
        Loopback by default (SUPERRES_METRICS_HOST): a laptop or a shared host does not show its metrics to
        the network; containers say 0.0.0.0 so that probes and scrapers from outside reach them.
        Port 0: off. A port already taken (another process here, node_exporter's 9100) costs the metrics,
        not the service: a warning, and the work goes on."""
        if not port:
            return None
        from wsgiref.simple_server import make_server

        server_class, server6_class, quiet = _server_classes()
        try:
            server = make_server(host, port, self.wsgi_app(), server6_class if ":" in host else server_class,
                                 handler_class=quiet)
        except OSError as exc:
            log.warning("metrics server not started",
                        extra={"fields": {"host": host, "port": port, "error": str(exc)}})
            return None
        threading.Thread(target=server.serve_forever, name="superres-metrics", daemon=True).start()
        log.info("serving metrics", extra={"fields": {"host": host, "port": port, "paths": "/metrics /healthz"}})
        return server


def _server_classes():
    """The metrics server's classes, made on first use: http.server and prometheus_client cost `superres
    upscale` (which serves nothing) ~50 ms of start-up if imported with this module."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class _Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True  # a slow scraper never holds up exit

    class _Server6(_Server):
        address_family = socket.AF_INET6  # "::" or an IPv6 address

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format, *args):  # scrapes every few seconds would drown the item lines
            pass

    return _Server, _Server6, _Quiet
