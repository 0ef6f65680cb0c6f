"""One small router per concern: classify, embed, explain, health and readiness, model information (and its
conv1 filters), the Prometheus scrape (``prometheus``; the series themselves are service/metrics.py's), the
pages, and the Open Inference Protocol under /v2 (last: its catch-all route answers the /v2 paths no route
serves)."""

from . import classify, embed, explain, health, inference_protocol, info, page, prometheus

ROUTERS = tuple(module.router for module in (classify, embed, explain, health, info, prometheus, page, inference_protocol))
