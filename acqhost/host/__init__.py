"""The compiled message pipeline: route table, stages, per-message context."""

from acqhost.host.context import Context, Effect
from acqhost.host.core import Pipeline, Route, build_routes

__all__ = ("Context", "Effect", "Pipeline", "Route", "build_routes")
