"""Telling: the Prometheus collector and the HTTP endpoint that serves it."""
