"""Several devices: workers with roles, the router, the pools and their autoscaler, the KV mover,
and the `Runtime` that drives them from one event loop. Imports the engine, never the API or TUI."""

from splitnode.runtime.config import RuntimeConfig, default_roles, parse_devices
from splitnode.runtime.runtime import Runtime, run_event_loop

__all__ = ["Runtime", "RuntimeConfig", "default_roles", "parse_devices", "run_event_loop"]
