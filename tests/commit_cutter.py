"""A TCP proxy in front of MariaDB that loses the reply to one COMMIT.

Once armed, it passes the next COMMIT (alone or ending a batch of
statements) to the server, lets the server commit, and then closes the client's connection before the reply reaches
it: the client cannot know whether its transaction committed.  Every other
byte goes through untouched.
"""
import socket
import threading
import time

COM_QUERY = b"\x03"


LINGER_SECS = 8


class CommitCutter:
    """``early``: cut the client as soon as its COMMIT is passed on, and
    keep the server's side open a while: the server works through the
    transaction (and commits it) with nobody waiting, as behind a network
    that failed between them."""

    def __init__(self, port, early=False):
        self.target, self.early = port, early
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.cut = threading.Event()   # set once a COMMIT's reply was lost
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url):
        """``url`` with the server's port replaced by this proxy's."""
        return url.replace(f":{self.target}/", f":{self.port}/")

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        server = socket.create_connection(("127.0.0.1", self.target))
        dropping = threading.Event()
        threading.Thread(target=self._replies, args=(server, client, dropping), daemon=True).start()
        pending = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                pending += data
                # MySQL packets: 3-byte little-endian length, sequence byte, payload.
                while len(pending) >= 4 and len(pending) >= 4 + int.from_bytes(pending[:3], "little"):
                    size = 4 + int.from_bytes(pending[:3], "little")
                    packet, pending = pending[:size], pending[size:]
                    payload = packet[4:]
                    # A COMMIT alone, or the last of a batch of statements.
                    hit = (self.armed.is_set() and payload[:1] == COM_QUERY
                           and payload[1:].strip().upper().rpartition(b";")[2] == b"COMMIT")
                    if hit:
                        self.armed.clear()
                        dropping.set()
                    server.sendall(packet)
                    if hit and self.early:
                        self.cut.set()
                        client.shutdown(socket.SHUT_RDWR)
                        time.sleep(LINGER_SECS)
                        return
        except OSError:
            pass
        finally:
            for sock in (client, server):
                try:
                    sock.close()
                except OSError:
                    pass

    def _replies(self, server, client, dropping):
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                if dropping.is_set():
                    if self.early:
                        continue       # nobody waits for it any more
                    time.sleep(0.05)   # the commit is done on the server: now cut
                    self.cut.set()
                    break
                client.sendall(data)
        except OSError:
            pass
        for sock in (client, server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
