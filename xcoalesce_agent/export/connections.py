"""Connections of the /metrics server between being accepted and being closed, in bounded resources.

A connection waiting for its (next) request waits in one selector, not in a thread; a fixed set of
HANDLER_THREADS threads serves requests that have begun to arrive; beyond MAX_CONNECTIONS new
connections are refused. Many scrapers at once thus cost bounded memory on Dom0.
"""
import queue
import selectors
import socket
import ssl
import threading
import time

HANDLER_THREADS = 8           # requests served at once; rendering is cached, so each takes milliseconds
MAX_CONNECTIONS = 512         # connections held at once, idle ones included; well below a 1024 fd limit
IDLE_SECONDS = 30             # a connection with no request coming is closed after this


class ConnectionPool(object):
    """The connections of one server between being accepted and being closed.

    A connection waits in one selector until its request begins to arrive (or IDLE_SECONDS pass),
    then one of HANDLER_THREADS threads calls `serve(connection, address, first)`, which returns
    whether to keep the connection open; if so it waits again. An idle kept-alive connection thus
    holds no thread, and a burst of scrapers is served as fast as the handlers go.
    """

    def __init__(self, serve, close):
        self._serve = serve
        self._close_connection = close
        self._lock = threading.Lock()
        self._arrived = []
        self._held = 0
        self._closed = False
        self._ready = queue.Queue()
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        for end in (self._wake_reader, self._wake_writer):
            end.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._threads = [threading.Thread(target=self._watch, name="metrics-http-idle")]
        self._threads += [threading.Thread(target=self._work, name="metrics-http-{}".format(number))
                          for number in range(HANDLER_THREADS)]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def add(self, connection, address):
        """Take a new connection; False (the caller closes it) when MAX_CONNECTIONS are held."""
        with self._lock:
            if self._closed or self._held >= MAX_CONNECTIONS:
                return False
            self._held += 1
        self._wait(connection, address, True)
        return True

    def close(self):
        """Close every waiting connection and end the threads; requests being served finish."""
        with self._lock:
            self._closed = True
        self._wake()
        for _ in range(HANDLER_THREADS):
            self._ready.put(None)

    def _wait(self, connection, address, first):
        with self._lock:
            self._arrived.append((connection, address, first))
        self._wake()

    def _wake(self):
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):  # a full pipe wakes the selector all the same
            pass

    def _watch(self):
        while True:
            with self._lock:
                arrived, self._arrived, closed = self._arrived, [], self._closed
            now = time.monotonic()
            for connection, address, first in arrived:
                if isinstance(connection, ssl.SSLSocket) and connection.pending():
                    self._ready.put((connection, address, first))  # decrypted bytes wait already
                else:
                    self._selector.register(connection, selectors.EVENT_READ, (address, first, now + IDLE_SECONDS))
            if closed:
                break
            for key, _ in self._selector.select(1.0):
                if key.fileobj is self._wake_reader:
                    self._drain_wake()
                    continue
                self._selector.unregister(key.fileobj)
                self._ready.put((key.fileobj, key.data[0], key.data[1]))
            now = time.monotonic()
            for key in list(self._selector.get_map().values()):
                if key.data is not None and key.data[2] <= now:
                    self._selector.unregister(key.fileobj)
                    self._release(key.fileobj)
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                self._release(key.fileobj)
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _drain_wake(self):
        try:
            while self._wake_reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _work(self):
        while True:
            item = self._ready.get()
            if item is None:
                return
            connection, address, first = item
            if self._serve(connection, address, first) and not self._closed:
                self._wait(connection, address, False)
            else:
                self._release(connection)

    def _release(self, connection):
        with self._lock:
            self._held -= 1
        self._close_connection(connection)
