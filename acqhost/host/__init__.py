"""The host core, synchronous: per-message context, host state, stages, routes, the core."""

from acqhost.host.context import Context, Effect
from acqhost.host.core import HostCore, Route, build_routes
from acqhost.host.state import HostState

__all__ = ("Context", "Effect", "HostCore", "HostState", "Route", "build_routes")
