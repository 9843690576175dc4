"""Integrations with optional libraries; each module imports its library lazily."""
