"""Shared by every component: the one settings object, metrics and health endpoints, logging."""
