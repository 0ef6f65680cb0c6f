"""One small router per concern: classify, health and readiness, model information, metrics."""
