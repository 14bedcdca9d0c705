"""gRPC over HTTP/2, served on the daemon's event loop (see server.py for why)."""
from .server import Server

__all__ = ["Server"]
