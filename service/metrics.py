"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand: three metric kinds
are a few dozen lines, not worth a dependency.

Every label has a bounded set of values, whatever clients send. ``route`` is the path template of the
route that answered (``ROUTE_EXAMPLES``), whatever its status, and ``unmatched`` for a path no route
matches (``service.logs.route_template``). ``method`` is one of ``HTTP_METHODS``, or ``OTHER`` for any
other token (``method_label``): the server accepts any token as a method, and each made-up one would
otherwise add series that are never removed."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The methods RFC 9110 defines, and PATCH (RFC 5789): each its own label value; any other, OTHER.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
OTHER_METHOD = "OTHER"


def method_label(method: str) -> str:
    """The ``method`` label for a request's method, from a fixed set, whatever the client sent."""
    return method if method in HTTP_METHODS else OTHER_METHOD


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labelnames=()):
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self._header() + [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when /metrics is scraped (queue depth, model info)."""

    kind = "gauge"

    def __init__(self, name, help, read: Callable[[], dict[tuple[str, ...], float]], labelnames=()):
        super().__init__(name, help, labelnames)
        self._read = read

    def render(self) -> list[str]:
        return self._header() + [
            f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in sorted(self._read().items())
        ]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets: Sequence[float], labelnames=()):
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[tuple[str, ...], list] = {}  # labels → [bucket counts…, sum, count]

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            series = self._series.setdefault(labels, [0] * len(self.buckets) + [0.0, 0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1  # stored per bucket; made cumulative when rendered
                    break
            series[-2] += value
            series[-1] += 1

    def render(self) -> list[str]:
        lines = self._header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for labels, series in items:
            cumulative = 0
            for bound, count in zip(self.buckets, series):
                cumulative += count
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, labels, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, labels)} {_number(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, labels)} {series[-1]}")
        return lines


class Registry:
    def __init__(self):
        self._metrics: list[_Metric] = []

    def add(self, metric):
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self._metrics for line in m.render()) + "\n"


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ROUTE_EXAMPLES = (
    "/classify, /embed, /explain, /model, /model/filters.png, /healthz, /readyz, /metrics, /, /docs, "
    "/static/{name}, /openapi.json, "
    # the Open Inference Protocol (routes/inference_protocol.py); /v2/{path:path}: any other path under /v2
    "/v2, /v2/health/live, /v2/health/ready, /v2/models/{model_name}, /v2/models/{model_name}/ready, "
    "/v2/models/{model_name}/infer, /v2/models/{model_name}/versions/{model_version}, "
    "/v2/models/{model_name}/versions/{model_version}/ready, /v2/models/{model_name}/versions/{model_version}/infer, "
    "/v2/models/{model_name}/config, /v2/models/{model_name}/versions/{model_version}/config, /v2/{path:path}"
)


class ServiceMetrics:
    """The service's metrics. Gauges read live state through the callables given."""

    def __init__(
        self, queue_depth: Callable[[], dict], model_info: Callable[[], dict], memory: Callable[[], dict] = dict
    ):
        self.registry = Registry()
        self._add_http_metrics()
        self._add_image_metrics()
        self._add_batch_metrics()
        self._add_gauges(queue_depth, model_info, memory)

    def _add_http_metrics(self) -> None:
        """Every HTTP request, by method, route and status, and its latency."""
        r = self.registry
        self.requests = r.add(
            Counter(
                "alexnet_http_requests_total",
                "HTTP requests by method, route and status. method: GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, "
                "TRACE, PATCH, or OTHER for any other token. status: 499 when the client closed the connection "
                "before the answer could be sent. route: the answering route's path template "
                f"({ROUTE_EXAMPLES}), or unmatched when no route matches the path (404; 307 for a trailing slash)",
                ("method", "route", "status"),
            )
        )
        self.latency = r.add(
            Histogram(
                "alexnet_http_request_duration_seconds",
                "HTTP request latency, by method and route (as in alexnet_http_requests_total; no status label)",
                LATENCY_BUCKETS,
                ("method", "route"),
            )
        )

    def _add_image_metrics(self) -> None:
        """Images classified, embedded and explained; Grad-CAM's time and refusals."""
        r = self.registry
        self.images = r.add(Counter("alexnet_images_classified_total", "images classified", ("crops",)))
        self.images_embedded = r.add(
            Counter("alexnet_images_embedded_total", "images embedded (/embed), by layer", ("layer",))
        )
        self.images_explained = r.add(
            Counter("alexnet_images_explained_total", "images explained (/explain), by answer format", ("format",))
        )
        self.explain_seconds = r.add(
            Histogram(
                "alexnet_explain_duration_seconds",
                "time of one Grad-CAM in an explain thread (the first per model also builds its net)",
                LATENCY_BUCKETS,
            )
        )
        self.explain_rejected = r.add(
            Counter(
                "alexnet_explain_rejections_total",
                "/explain requests refused with 503: ALEXNET_EXPLAIN_CONCURRENCY already under way",
            )
        )

    def _add_batch_metrics(self) -> None:
        """The batcher's batches, forward passes and refusals; the body budget's refusals; reloads."""
        r = self.registry
        self.batch_rows = r.add(
            Histogram("alexnet_batch_size", "network inputs (images × crops) per forward pass", BATCH_BUCKETS)
        )
        self.batch_requests = r.add(
            Histogram("alexnet_batch_requests", "requests served by one forward pass", BATCH_BUCKETS)
        )
        self.forward_seconds = r.add(
            Histogram("alexnet_forward_duration_seconds", "time of one batched forward pass", LATENCY_BUCKETS)
        )
        self.queue_wait = r.add(
            Histogram("alexnet_queue_wait_seconds", "time a request waited for its forward pass", LATENCY_BUCKETS)
        )
        self.rejected = r.add(Counter("alexnet_queue_rejections_total", "requests refused with 503: queue full"))
        self.memory_busy = r.add(
            Counter("alexnet_memory_busy_total", "requests refused with 503: no room for their body in the body budget")
        )
        self.reloads = r.add(Counter("alexnet_model_reloads_total", "checkpoint reloads by result", ("result",)))

    def _add_gauges(self, queue_depth: Callable[[], dict], model_info: Callable[[], dict], memory: Callable[[], dict]):
        """Gauges read live state through the callables given, when /metrics is rendered."""
        r = self.registry
        r.add(
            Gauge(
                "alexnet_memory_bytes",
                "the memory bound (docs/serving.md, Memory): bytes held and the budget of request bodies and of "
                "decodes (budget=bodies|decodes, of=in_use|capacity), and the start-up check's worst case and the "
                "cgroup's limit (budget=process, of=worst_case|limit; no limit: not reported)",
                memory,
                ("budget", "of"),
            )
        )
        r.add(
            Gauge(
                "alexnet_queue_depth",
                "requests admitted to the batcher (reading, decoding, waiting or in a forward pass), network "
                "inputs waiting, and /explain requests under way",
                queue_depth,
                ("kind",),
            )
        )
        r.add(
            Gauge(
                "alexnet_model_info",
                "the model being served (value 1). trained: weights from training or an import, not a fresh "
                "init; val_top1_error, val_top5_error: how good they are, as the checkpoint records ('' if not)",
                model_info,
                ("checkpoint", "sha256", "trained", "val_top1_error", "val_top5_error"),
            )
        )

    def render(self) -> str:
        return self.registry.render()
