"""One small router per concern: classify, embed, explain, health and readiness, model information (and its
conv1 filters), metrics, the pages."""

from . import classify, embed, explain, health, info, metrics, page

ROUTERS = tuple(module.router for module in (classify, embed, explain, health, info, metrics, page))
