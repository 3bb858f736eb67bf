"""The compiled message pipeline: route table, stages, per-message context."""

from acqhost.pipeline.context import Context, Effect
from acqhost.pipeline.host import Pipeline, Route, build_routes

__all__ = ("Context", "Effect", "Pipeline", "Route", "build_routes")
