"""The SMPP 3.4 side of the sms job: one bound transceiver session (bind_transceiver) with
smpplib 2.2.4.

Blocking code: the job calls it from one dedicated thread only (stream_jobs/sms.py), so
the socket is never shared. A window of SMS is sent as pipelined submit_sm PDUs (every
part of every message), then the answers are read, matched by sequence number. Every part
asks for a delivery receipt (registered_delivery 1); receipts (deliver_sm) that arrive
during submits are collected and acknowledged, and the job polls for the rest every 1 s.

Text is always UCS2 (data_coding 8): `smpplib.gsm.make_parts` splits a text longer than
70 characters into parts of 67 with a concatenation UDH (esm_class 0x40). The parts of a
message are made once, so a part re-sent after a dropped link carries the same
concatenation reference as its siblings.

`SmscUnavailable` (the job retries the parts not yet accepted): no connection, a refused
bind, a dropped link, no answer within RESPONSE_TIMEOUT_S (10 s; the link is dropped),
or a transient status (ESME_RTHROTTLED, ESME_RMSGQFUL, ESME_RSYSERR). Any other status
refuses the SMS for good.
"""

from __future__ import annotations

import contextlib
import select
import time
from dataclasses import dataclass, field
from typing import Any

import smpplib.client
import smpplib.consts
import smpplib.exceptions
import smpplib.gsm
import smpplib.smpp
import structlog

from stream_jobs.errors import StreamJobError
from stream_jobs.sms_core import Sms, parse_receipt

RESPONSE_TIMEOUT_S = 10.0  # a window whose answers take longer: the link is dropped
SOCKET_TIMEOUT_S = 1.0  # one read; the response deadline is checked between reads
ENQUIRE_LINK_IDLE_S = 30.0  # an idle link is checked this often
# Answers that mean "not now": the part is sent again after a back-off.
TRANSIENT_STATUSES = frozenset(
    {
        smpplib.consts.SMPP_ESME_RTHROTTLED,
        smpplib.consts.SMPP_ESME_RMSGQFUL,
        smpplib.consts.SMPP_ESME_RSYSERR,
    }
)
LINK_ERRORS = (smpplib.exceptions.ConnectionError, smpplib.exceptions.PDUError, OSError)
DELIVERY_RECEIPT_ESM = 0x04  # esm_class bits 2-5 = 0001: SMSC delivery receipt


class SmscUnavailable(StreamJobError):
    """The SMSC could not be reached, refused the bind, dropped the link, did not answer
    in time, or said it is busy. Answers already received are kept in the Submissions."""


@dataclass
class Submission:
    """One SMS on its way: its parts and, per part, the SMSC's message id once accepted."""

    sms: Sms
    parts: list[bytes]
    data_coding: int
    esm_class: int
    accepted: dict[int, str] = field(default_factory=dict)  # part index → SMSC message id
    refused_status: int | None = None  # a permanent refusal: the SMS is given up
    answered_at: float = 0.0  # time.time() of the last part's answer

    @classmethod
    def of(cls, sms: Sms) -> Submission:
        parts, coding, esm = smpplib.gsm.make_parts(
            sms.text, encoding=smpplib.consts.SMPP_ENCODING_ISO10646
        )
        return cls(sms, list(parts), int(coding), int(esm))

    @property
    def done(self) -> bool:
        return self.refused_status is not None or len(self.accepted) == len(self.parts)

    @property
    def smsc_message_ids(self) -> tuple[str, ...]:
        return tuple(self.accepted[i] for i in sorted(self.accepted))


@dataclass(frozen=True)
class Receipt:
    smsc_message_id: str
    stat: str
    received_at: float


class SmppLink:
    def __init__(
        self,
        host: str,
        port: int,
        system_id: str,
        password: str,
        source_addr: str,
        log: Any = None,
    ) -> None:
        self.host, self.port = host, port
        self.system_id, self.password, self.source_addr = system_id, password, source_addr
        self.log: Any = log or structlog.get_logger(component="smpp")
        self._client: smpplib.client.Client | None = None
        self._receipts: list[Receipt] = []
        self._waiting: dict[int, tuple[Submission, int]] = {}  # sequence → (SMS, part)
        self._busy = False  # a transient refusal seen in this window
        self._last_io = 0.0

    @property
    def bound(self) -> bool:
        return self._client is not None

    # ------------------------------------------------------------------ session

    def _ensure_bound(self) -> smpplib.client.Client:
        if self._client is not None:
            return self._client
        client = smpplib.client.Client(
            self.host,
            self.port,
            timeout=SOCKET_TIMEOUT_S,
            logger_name="smpplib.medclear",
            allow_unknown_opt_params=True,
        )
        client.set_message_sent_handler(self._on_submit_resp)
        client.set_message_received_handler(self._on_deliver_sm)
        client.set_error_pdu_handler(self._on_error_pdu)
        try:
            client.connect()
            client.bind_transceiver(system_id=self.system_id, password=self.password)
        except LINK_ERRORS as exc:
            self._drop(client)
            raise SmscUnavailable(f"bind to {self.host}:{self.port} failed: {exc}") from exc
        self._client = client
        self._last_io = time.monotonic()
        self.log.info("smsc bound", host=self.host, port=self.port)
        return client

    def _drop(self, client: smpplib.client.Client | None) -> None:
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken socket: nothing to say
                client.disconnect()
        if client is self._client:
            self._client = None
        self._waiting.clear()

    def close(self) -> None:
        client = self._client
        if client is None:
            return
        with contextlib.suppress(*LINK_ERRORS):
            client.unbind()
        self._drop(client)

    # ------------------------------------------------------------------ handlers

    def _on_submit_resp(self, pdu: Any, **_: Any) -> None:
        entry = self._waiting.pop(int(pdu.sequence), None)
        if entry is None:
            return  # an answer to a PDU of a dropped link: the part was sent again
        submission, part = entry
        status = int(pdu.status or 0)
        if status == smpplib.consts.SMPP_ESME_ROK:
            raw = pdu.message_id
            submission.accepted[part] = raw.decode() if isinstance(raw, bytes) else str(raw)
        elif status in TRANSIENT_STATUSES:
            self._busy = True
        else:
            submission.refused_status = status
        if submission.done:
            submission.answered_at = time.time()

    def _on_error_pdu(self, pdu: Any) -> None:
        if pdu.command == "submit_sm_resp":
            return  # read_once hands it to _on_submit_resp next
        if pdu.command == "generic_nack":
            entry = self._waiting.pop(int(pdu.sequence), None)
            if entry is not None:
                self._busy = True  # the part is sent again after a back-off
            return
        raise smpplib.exceptions.PDUError(f"{pdu.command} status {pdu.status}")

    def _on_deliver_sm(self, pdu: Any, **_: Any) -> int:
        esm = int(pdu.esm_class or 0)
        if esm & DELIVERY_RECEIPT_ESM:
            body = pdu.short_message or b""
            text = body.decode("latin-1") if isinstance(body, bytes) else str(body)
            parsed = parse_receipt(text)
            receipted = getattr(pdu, "receipted_message_id", None)
            if isinstance(receipted, bytes):
                receipted = receipted.decode("latin-1")
            if parsed is not None:
                message_id, stat = parsed
                self._receipts.append(Receipt(receipted or message_id, stat, time.time()))
        return int(smpplib.consts.SMPP_ESME_ROK)

    def _take_receipts(self) -> list[Receipt]:
        receipts, self._receipts = self._receipts, []
        return receipts

    # ------------------------------------------------------------------ operations

    def submit(self, submissions: list[Submission]) -> list[Receipt]:
        """Send every part not yet accepted, wait for every answer. Returns the receipts
        seen meanwhile. SmscUnavailable: the caller backs off and calls again with the
        same Submissions (parts accepted before are not sent again)."""
        client = self._ensure_bound()
        self._busy = False
        try:
            self._send_parts(client, submissions)
            deadline = time.monotonic() + RESPONSE_TIMEOUT_S
            while self._waiting:
                if time.monotonic() > deadline:
                    raise SmscUnavailable(f"no answer within {RESPONSE_TIMEOUT_S} s")
                try:
                    client.read_once(auto_send_enquire_link=False)
                except TimeoutError:  # a quiet second; the deadline decides
                    continue
        except SmscUnavailable:
            self._drop(client)
            raise
        except LINK_ERRORS as exc:
            self._drop(client)
            raise SmscUnavailable(f"link to the SMSC lost: {exc!r}") from exc
        self._last_io = time.monotonic()
        if self._busy:
            raise SmscUnavailable("the SMSC is busy (throttled / queue full)")
        return self._take_receipts()

    def _send_parts(self, client: smpplib.client.Client, submissions: list[Submission]) -> None:
        for submission in submissions:
            if submission.done:
                continue
            for index, part in enumerate(submission.parts):
                if index in submission.accepted:
                    continue
                pdu = client.send_message(
                    source_addr_ton=smpplib.consts.SMPP_TON_UNK,
                    source_addr_npi=smpplib.consts.SMPP_NPI_UNK,
                    source_addr=self.source_addr,
                    dest_addr_ton=smpplib.consts.SMPP_TON_INTL,
                    dest_addr_npi=smpplib.consts.SMPP_NPI_ISDN,
                    destination_addr=submission.sms.destination,
                    short_message=part,
                    data_coding=submission.data_coding,
                    esm_class=submission.esm_class,
                    registered_delivery=smpplib.consts.SMPP_SMSC_DELIVERY_RECEIPT_BOTH,
                )
                self._waiting[int(pdu.sequence)] = (submission, index)

    def poll(self) -> list[Receipt]:
        """Read what the SMSC sent while idle (receipts, enquire_link); keep an idle link
        alive. Does not connect: a link that is down is brought up by the next submit."""
        client = self._client
        if client is None:
            return self._take_receipts()
        try:
            sock = client._socket
            while sock is not None and select.select([sock], [], [], 0)[0]:
                client.read_once(auto_send_enquire_link=False)
            if time.monotonic() - self._last_io > ENQUIRE_LINK_IDLE_S:
                client.send_pdu(smpplib.smpp.make_pdu("enquire_link", client=client))
                self._last_io = time.monotonic()
        except LINK_ERRORS:
            self._drop(client)
        return self._take_receipts()
