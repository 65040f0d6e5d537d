"""The simulated xapi: an object database and the XML-RPC server the real XenAPI client talks to.

    db = Database()
    host = db.create("host", name_label="xcp1")          # any field of schema.CLASSES; defaults for the rest
    db.create("pool", master=host)
    server = XapiServer(db, "/tmp/x/xapi.sock").start()   # ... server.stop()
    session = connect("/tmp/x/xapi.sock")                 # a logged-in XenAPI.Session

The rest of the simulated host works on `db` (thread-safe; hold `db.lock` to group changes):
get/get_field/set/update/destroy/find/ref_of/all/records/exists, add_to_map/remove_from_map,
freeze_io/thaw_io/io_frozen/downtime, register_plugin/register_sr_scan, `db.faults`; `vm.run()` for
power operations and `tasks` for task records.
"""
from .client import UnixSocketTransport, connect
from .db import Database
from .downtime import Interval
from .errors import XapiError
from .schema import NULL_REF
from .server import XapiServer

__all__ = ["Database", "Interval", "NULL_REF", "UnixSocketTransport", "XapiError", "XapiServer", "connect"]
