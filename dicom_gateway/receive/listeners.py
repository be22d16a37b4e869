"""The Storage SCP's listening sockets: plain TCP and TLS (PS3.15 Annex B), optionally SO_REUSEPORT.

`start_listener` does what `AE.start_server(block=False)` does, with the server class the listener
needs: SO_REUSEPORT for receiver processes (several processes share one port, the kernel spreads the
connections), and for TLS a handshake run in each connection's own thread.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

log = logging.getLogger("dxgate.scp")

LISTEN_BACKLOG = 256
"""Connections the kernel queues before accept (socketserver's default of 5 drops a burst of connections)."""
CONNECTION_SLACK = 4
"""Connections a host may open beyond its association limit: those few get a proper A-ASSOCIATE-RJ
(transient), a flood beyond them is closed at accept."""


class PlainAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with a listen backlog for bursts of connections, and a cap on
    the connections one host holds open (associated or not yet), checked before a thread is started for one.

    Without the cap, a peer opening a thousand TCP connections that never associate gets a thousand threads
    polling until their ARTIM timers expire, and the associations of every other caller are refused meanwhile.
    """

    request_queue_size = LISTEN_BACKLOG
    max_connections_per_host = 0
    """0 = no cap; limits.max_associations_per_host + CONNECTION_SLACK in the SCP."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._starting: dict[int, str] = {}
        self._starting_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        cap = self.max_connections_per_host
        if cap <= 0:
            return True
        host = client_address[0]
        with self._starting_lock:  # accepted connections whose association thread has not started yet count too
            starting = sum(1 for h in self._starting.values() if h == host)
            live = starting + sum(1 for a in self.ae.active_associations if a.requestor.address == host)
            if live < cap:
                self._starting[id(request)] = host
                return True
        log.warning("connection refused", extra={
            "peer": host, "reason": f"{live} connections from this host are open "
                                    f"(limits.max_associations_per_host: {cap})"})
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # starts the association's thread
        finally:
            self.forget(request)

    def forget(self, request: Any) -> None:
        """The connection's association has started (or the connection is closed): count it as live only."""
        with self._starting_lock:
            self._starting.pop(id(request), None)


class ReusePortAssociationServer(PlainAssociationServer):
    """A threaded association server whose listening socket sets SO_REUSEPORT before bind (Linux).

    Several processes listening so on one port share it; the kernel spreads incoming connections.
    """

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _HandshakeInConnectionThread:
    """TLS servers: the handshake runs in the connection's own thread, bounded by a timeout.

    pynetdicom wraps accepted sockets in the accept loop, handshake included, so one client that
    connects and stays silent would hold up every other connection. Here the accept loop only wraps;
    a failed handshake (no or an untrusted client certificate, plain TCP on the TLS port, a timeout)
    closes that connection alone and is logged with the peer address.
    """

    handshake_timeout_s: float = 30.0
    socket: socket.socket | None
    ssl_context: ssl.SSLContext | None

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None and self.ssl_context is not None
        sock, address = self.socket.accept()
        return self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.handshake_timeout_s)
            request.do_handshake()
            request.settimeout(None)
        except (ssl.SSLError, OSError) as exc:
            why = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("TLS handshake refused", extra={"reason": f"from {client_address[0]}: {why}"})
            self.shutdown_request(request)  # type: ignore[attr-defined]
            self.forget(request)  # type: ignore[attr-defined]
            return
        super().process_request_thread(request, client_address)  # type: ignore[misc]


class TlsAssociationServer(_HandshakeInConnectionThread, PlainAssociationServer):
    """The TLS listener (PS3.15 Annex B)."""


class TlsReusePortAssociationServer(_HandshakeInConnectionThread, ReusePortAssociationServer):
    """The TLS listener of a receiver process (SO_REUSEPORT)."""


def start_listener(ae: AE, address: tuple[str, int], handlers: list[tuple[Any, Callable[..., Any]]], *,
                   tls_context: ssl.SSLContext | None, reuse_port: bool, handshake_timeout_s: float,
                   max_connections_per_host: int = 0) -> ThreadedAssociationServer:
    """Listen on `address` in a background thread; `AE.shutdown()` stops it, as for start_server()."""
    server_class: type[ThreadedAssociationServer]
    if tls_context is not None:
        server_class = TlsReusePortAssociationServer if reuse_port else TlsAssociationServer
    else:
        server_class = ReusePortAssociationServer if reuse_port else PlainAssociationServer
    server = ae.make_server(address, ssl_context=tls_context, evt_handlers=handlers, server_class=server_class)
    if isinstance(server, PlainAssociationServer):
        server.max_connections_per_host = max_connections_per_host + CONNECTION_SLACK if max_connections_per_host else 0
    if isinstance(server, _HandshakeInConnectionThread):
        server.handshake_timeout_s = handshake_timeout_s
    name = f"AcceptorServer-{'tls' if tls_context is not None else 'plain'}-{address[1]}"
    thread = threading.Thread(target=make_target(server.serve_forever), name=name, daemon=True)
    thread.start()
    ae._servers.append(server)
    return server
