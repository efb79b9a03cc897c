"""The local API: msgpack-RPC over a Unix socket (protocol.py has the wire format)."""

from splitnode.api.client import Client
from splitnode.api.protocol import (
    RemoteError,
    ServerBusy,
    ServerNotRunning,
    ServerShuttingDown,
    SocketInUse,
    default_socket_path,
)
from splitnode.api.server import Server, serve

__all__ = ["Client", "RemoteError", "Server", "ServerBusy", "ServerNotRunning", "ServerShuttingDown", "SocketInUse",
           "default_socket_path", "serve"]
