"""The local API: msgpack-RPC over a Unix socket (protocol.py has the wire format)."""

from splitnode.api.client import Client
from splitnode.api.protocol import RemoteError, ServerNotRunning, SocketInUse, default_socket_path
from splitnode.api.server import Server, serve

__all__ = ["Client", "RemoteError", "Server", "ServerNotRunning", "SocketInUse", "default_socket_path", "serve"]
