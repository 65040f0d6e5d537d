"""The simulated xapi: an object database and the XML-RPC server the real XenAPI client talks to."""
from .client import UnixSocketTransport, connect
from .db import Database
from .downtime import Interval
from .errors import XapiError
from .schema import NULL_REF
from .server import XapiServer

__all__ = ["Database", "Interval", "NULL_REF", "UnixSocketTransport", "XapiError", "XapiServer", "connect"]
