"""Several devices: workers with roles, the router, the pools and their autoscaler, the KV mover,
and the `Runtime` that drives them from one event loop. Imports the engine, never the API or TUI."""

from splitnode.runtime.runtime import Runtime, RuntimeConfig, run_event_loop

__all__ = ["Runtime", "RuntimeConfig", "run_event_loop"]
