"""A virtual 社保卡 in a virtual reader: a TCP client of pcscd's vpcd driver, serving the
pure applet of reader_agent/card.py. `medclear card-emulator run --card C` serves a card.

vpcd framing (../shared/INFRA.md): every frame is a 2-byte big-endian length, then the
payload. A 1-byte payload is control (0 power off, 1 power on, 2 reset, 4 send the ATR
back); a longer one is a command APDU, answered with the response APDU. Connecting is
inserting the card; closing the connection is pulling it out. The socket sets
TCP_NODELAY and TCP_QUICKACK, so an answer is neither held back nor its ACK delayed.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

import structlog

from clearing.validate import mask_card
from reader_agent.card import CardImage, SsseApplet

log = structlog.get_logger(process="card-emulator")

VPCD_PORT_DEFAULT = 35963  # reader "Virtual PCD 00 00"; the next port is "00 01"
CONNECT_TIMEOUT_S = 10.0
CONNECT_ATTEMPT_S = 1.0  # one connection attempt to vpcd
THREAD_JOIN_S = 2.0
FRAME_BYTES_MAX = 65_535
POWER_OFF, POWER_ON, RESET, GET_ATR = 0, 1, 2, 4
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)  # Linux: answer without delayed ACK


def _atr() -> bytes:
    """TS 3B; T0 with TD1 and the historical bytes; TD1: TD2 follows, T=0 offered;
    TD2: T=1; historical bytes "SSSE"; TCK (XOR of T0..last), needed when T=1 is offered."""
    historical = b"SSSE"
    body = bytes((0x80 | len(historical), 0x80, 0x01)) + historical
    tck = 0
    for b in body:
        tck ^= b
    return b"\x3b" + body + bytes((tck,))


ATR = _atr()


class VirtualCard:
    """One card image served to one vpcd reader slot, in a background thread.

    `pull_after_apdus=N` pulls the card out (closes the connection) when the N-th command
    APDU arrives, before answering it: a card taken out in the middle of a read."""

    def __init__(
        self,
        image: CardImage,
        host: str = "127.0.0.1",
        port: int = VPCD_PORT_DEFAULT,
        pull_after_apdus: int | None = None,
        on_counter: Callable[[CardImage], None] | None = None,
    ) -> None:
        self.applet = SsseApplet(image)
        self.host, self.port = host, port
        self.pull_after_apdus = pull_after_apdus
        self.on_counter = on_counter  # called with the image after every cryptogram
        self.apdus = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def image(self) -> CardImage:
        return self.applet.image

    def load(self, image: CardImage) -> None:
        """Swap the card in place (between transactions, as one card after another)."""
        with self._lock:
            self.applet = SsseApplet(image)

    def insert(self, timeout_s: float = CONNECT_TIMEOUT_S) -> VirtualCard:
        """Connect to vpcd (retried until it listens) and serve in a daemon thread."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=CONNECT_ATTEMPT_S)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"no vpcd reader listening on {self.host}:{self.port}: {exc}"
                    ) from exc
                time.sleep(0.05)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self.apdus = 0
        self._thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
        self._thread.start()
        log.info("card inserted", card=mask_card(self.image.card_no), port=self.port)
        return self

    def remove(self) -> None:
        """Pull the card out: close the connection; vpcd reports the card absent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=THREAD_JOIN_S)
        self._thread = None

    @property
    def inserted(self) -> bool:
        return self._sock is not None

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                payload = _recv_frame(sock)
                if payload is None:
                    return
                if len(payload) > 1:
                    self.apdus += 1
                answer = self._handle(payload)
                if answer is not None:
                    sock.sendall(struct.pack(">H", len(answer)) + answer)
                if self.pull_after_apdus is not None and self.apdus >= self.pull_after_apdus:
                    log.info("card pulled out mid-transaction", apdus=self.apdus)
                    self._sock = None
                    sock.close()
                    return
        except OSError:
            return  # removed (closed under us) or vpcd went away

    def _handle(self, payload: bytes) -> bytes | None:
        if len(payload) == 1:
            control = payload[0]
            if control == GET_ATR:
                return ATR
            if control in (POWER_ON, RESET, POWER_OFF):
                with self._lock:
                    self.applet.reset()
            return None
        with self._lock:
            before = self.applet.image.counter
            response = self.applet.process(payload)
            image = self.applet.image
        if image.counter != before and self.on_counter is not None:
            self.on_counter(image)
        return response


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        if not chunk:
            return None
        data += chunk
    return data


def _recv_frame(sock: socket.socket) -> bytes | None:
    header = _recv_exact(sock, 2)
    if header is None:
        return None
    (length,) = struct.unpack(">H", header)
    if length == 0:
        return b""
    return _recv_exact(sock, length)
