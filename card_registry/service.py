"""The card registry gRPC service for service windows and the 12333 hotline.

Each operation becomes one command on the person's aggregate and waits for the worker's
decision, so a loss report is acknowledged only after the aggregate has it: every swipe
decided after that acknowledgement is declined.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from clearing import core, ingress, model, validate
from clearing.codes import CardKind, CardState, InsuranceCategory, ResultCode
from clearing.limits import PVV_BYTES
from clearing.model import Command, Reply
from clearing.validate import mask_phone
from medclear.infra import bounds, status
from medclear.infra.card_index import CardIndex
from medclear.infra.hsm_client import HSM_WINDOW_CALL_TIMEOUT_S, HsmClient
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.policy import load_policy
from medclear.infra.replies import Requester
from medclear.infra.rpc import (
    Clock,
    message,
    pb_enum,
    result_pb,
    shanghai_iso,
    state_of,
    system_clock_ms,
)
from medclear.infra.serving import serve_commands
from medclear.infra.settings import get_settings
from medclear.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from monitoring import metrics

Ctx: TypeAlias = grpc.aio.ServicerContext
RECENT_TRANSACTIONS_MAX = 20  # shown by GetPerson, newest first


MakeEnrolment = Callable[[str, int, str, str], model.EnrolPerson]


def _request_fault(request: Any, prefix: str = "") -> str | None:
    """What makes a window request malformed before anything else is looked at: a field
    over its bound, or a request id that is not an id (None: neither)."""
    detail = bounds.oversized(request, prefix)
    if detail is None and not validate.is_id(request.window.request_id):
        detail = "window.request_id must be an id of 1-64 letters, digits or . _ : / -"
    return detail


class CardRegistry(registry_pb2_grpc.CardRegistryServiceServicer):
    def __init__(
        self,
        requests: Requester,
        cards: CardIndex,
        deadline_ms: int,
        clock: Clock = system_clock_ms,
        hsm_address: str = "",
        pki_dir: Path | None = None,
        policy: model.Policy | None = None,
    ):
        self.requests = requests
        self.cards = cards
        self.policy = policy if policy is not None else model.Policy()
        self.deadline_s = deadline_ms / 1000
        self.clock = clock
        # With an HSM, a new PIN arrives as a PIN block under the window's PIN key and the
        # HSM turns it into the card's verification value; without one (terminal security
        # off) the aggregate only records that the initial PIN was changed.
        self.hsm = (
            HsmClient(hsm_address, pki_dir, HSM_WINDOW_CALL_TIMEOUT_S) if hsm_address else None
        )

    async def _run(
        self,
        method: str,
        request: Any,
        ssn: str,
        card_no: str,
        make: Callable[[str, int, str], Command],
    ) -> registry_pb2.RegistryReply:
        """Resolve the person, build the command, wait for the decision, translate it."""
        started = time.perf_counter()
        window: common_pb2.WindowContext = request.window
        request_id = window.request_id
        reply = Reply(request_id, ResultCode.MALFORMED_REQUEST)
        detail = _request_fault(request) or ""
        if not detail and not (ssn or card_no):
            detail = "give the ssn or the card number"
        if not detail:
            if not ssn:
                ssn, found = await self.cards.owner_of(card_no)
                reply = Reply(request_id, found)  # UNAVAILABLE: a full index lacks it
                if found == ResultCode.CARD_UNKNOWN:  # no one's card: the core decides
                    reply = ingress.decide_unrouted(make(request_id, self.clock(), ""), self.policy)
            if ssn:
                reply = await self._ask(make(request_id, self.clock(), ssn))
        metrics.GATEWAY_SECONDS.labels(method).observe(time.perf_counter() - started)
        return self._answer(method, request_id, reply, ssn, detail)

    @staticmethod
    def _answer(
        method: str, request_id: str, reply: Reply, ssn: str, detail: str
    ) -> registry_pb2.RegistryReply:
        """The worker's decision (or a refusal made here) as the service's reply."""
        metrics.GATEWAY_RESULTS.labels(method, reply.result.name).inc()
        card = None
        if reply.card_no:
            card = common_pb2.CardInfo(
                card_no=reply.card_no,
                state=pb_enum(reply.card_state),
            )
        return registry_pb2.RegistryReply(
            result=result_pb(reply.result),
            message=message(reply.result, detail),
            request_id=request_id,
            replayed=reply.replayed,
            state=state_of(ssn, reply),
            card=card,
            balance_fen=reply.balance_fen,
        )

    async def _ask(self, command: Command) -> Reply:
        return await self.requests.ask(command, self.deadline_s)

    def _card_op(
        self, method: str, op: str
    ) -> Callable[[registry_pb2.CardRequest, Ctx], Awaitable[registry_pb2.RegistryReply]]:
        async def handler(
            request: registry_pb2.CardRequest, context: Ctx
        ) -> registry_pb2.RegistryReply:
            return await self._run(
                method,
                request,
                request.ssn,
                request.card_no,
                lambda rid, at, ssn: model.CardCommand(
                    rid, at, ssn, request.card_no, op, request.reason
                ),
            )

        return handler

    async def RegisterPerson(
        self, request: registry_pb2.RegisterPersonRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._run(
            "RegisterPerson",
            request,
            request.ssn,
            "",
            lambda rid, at, ssn: model.RegisterPerson(
                rid,
                at,
                ssn,
                request.name,
                InsuranceCategory(request.category),
                request.phone,
                request.region,
            ),
        )

    async def IssueCard(
        self, request: registry_pb2.IssueCardRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        """A social security card (initial PIN, to be activated) or a temporary card, made
        with its PIN: from `new_pin_block` through the HSM, or `pin_verification_value`."""
        refused = self._bounded(request)
        if refused is not None:
            return refused
        try:
            kind = CardKind(request.kind)
        except ValueError:
            kind = CardKind.CARD_KIND_UNSPECIFIED  # unknown to this version: malformed
        temporary = kind == CardKind.TEMPORARY
        pvv = request.pin_verification_value.hex()
        given = request.new_pin_block or request.pin_verification_value
        detail = ""
        if given and not temporary:
            detail = "a social security card is made with the initial PIN: send no PIN"
        elif request.new_pin_block and request.pin_verification_value:
            detail = "send the new PIN block or its verification value, not both"
        elif pvv and not validate.is_pvv(pvv):
            detail = f"pin_verification_value must be {PVV_BYTES} bytes from the HSM"
        elif temporary and self.hsm is not None and not given:
            detail = "new_pin_block: a temporary card is made with its PIN"
        if detail:
            return self._refused(request.window.request_id, ResultCode.MALFORMED_REQUEST, detail)
        if temporary and request.new_pin_block:
            found = await self._pvv(
                request.window.window_id, request.new_pin_block, request.card_no
            )
            if isinstance(found, ResultCode):
                return self._refused(request.window.request_id, found)
            pvv = found
        return await self._run(
            "IssueCard",
            request,
            request.ssn,
            "",
            lambda rid, at, ssn: model.IssueCard(rid, at, ssn, request.card_no, kind, pvv=pvv),
        )

    async def ActivateCard(
        self, request: registry_pb2.CardRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._card_op("ActivateCard", "activate")(request, context)

    async def ReportPreLoss(
        self, request: registry_pb2.CardRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._card_op("ReportPreLoss", "report_pre_loss")(request, context)

    async def ConfirmLoss(
        self, request: registry_pb2.CardRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._card_op("ConfirmLoss", "confirm_loss")(request, context)

    async def ReleaseLoss(
        self, request: registry_pb2.CardRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._card_op("ReleaseLoss", "release")(request, context)

    async def Freeze(
        self, request: registry_pb2.CardRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._card_op("Freeze", "freeze")(request, context)

    async def Unfreeze(
        self, request: registry_pb2.CardRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._card_op("Unfreeze", "unfreeze")(request, context)

    async def Unlock(
        self, request: registry_pb2.CardRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._card_op("Unlock", "unlock")(request, context)

    async def _pvv(self, window_id: str, pin_block: bytes, card_no: str) -> str | ResultCode:
        """The new PIN's verification value from the HSM ("" when there is no HSM: terminal
        security off), or the code that refuses the request."""
        if self.hsm is None:
            return ""
        code, pvv = await self.hsm.set_pin(window_id, pin_block, card_no)
        return pvv if code == ResultCode.OK else code

    def _bounded(self, request: Any) -> registry_pb2.RegistryReply | None:
        """The refusal of a request with a field over its bound (checked before any HSM
        call or command); None when every field is within its bound."""
        detail = bounds.oversized(request)
        if detail is None:
            return None
        metrics.GATEWAY_RESULTS.labels(type(request).__name__, "MALFORMED_REQUEST").inc()
        return self._refused(request.window.request_id, ResultCode.MALFORMED_REQUEST, detail)

    @staticmethod
    def _refused(request_id: str, code: ResultCode, detail: str = "") -> registry_pb2.RegistryReply:
        """An answer given here, before any command is sent."""
        return registry_pb2.RegistryReply(
            result=result_pb(code), message=message(code, detail), request_id=request_id
        )

    async def ChangePin(
        self, request: registry_pb2.ChangePinRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        refused = self._bounded(request)
        if refused is not None:
            return refused
        pvv = await self._pvv(request.window.window_id, request.new_pin_block, request.card_no)
        if isinstance(pvv, ResultCode):
            return self._refused(request.window.request_id, pvv)
        return await self._run(
            "ChangePin",
            request,
            request.ssn,
            request.card_no,
            lambda rid, at, ssn: model.CardCommand(
                rid, at, ssn, request.card_no, "change_pin", pvv=pvv
            ),
        )

    def _enrolment(
        self, request: registry_pb2.EnrolPersonRequest
    ) -> tuple[ResultCode, MakeEnrolment, str]:
        """What is checked before the HSM is asked: the answer the core's deciders give a
        person not yet registered (core.new_person_enrolment, the worker's own rules
        without building the person: any malformed field is answered here, nothing
        produced) and a card number the card index holds for another person
        (CARD_EXISTS). Returns the code, how to make the command and the malformed field."""
        try:
            category = InsuranceCategory(request.category)
        except ValueError:  # a number this version does not know: malformed, below
            category = InsuranceCategory.INSURANCE_CATEGORY_UNSPECIFIED

        def make(rid: str, at_ms: int, ssn: str, pvv: str = "") -> model.EnrolPerson:
            return model.EnrolPerson(
                rid,
                at_ms,
                ssn,
                request.name,
                category,
                request.phone,
                request.region,
                request.card_no,
                CardKind.SOCIAL_SECURITY,
                pvv,
                request.opening_balance_fen,
                request.source_id,
            )

        command = make(request.window.request_id, self.clock(), request.ssn)
        code = core.new_person_enrolment(command)
        if code == ResultCode.OK:
            owner = self.cards.owner_now(request.card_no)
            if owner is not None and owner != request.ssn:
                code = ResultCode.CARD_EXISTS
        malformed = code == ResultCode.MALFORMED_REQUEST
        detail = (core.enrolment_fault(command) or "") if malformed else ""
        return code, make, detail

    async def EnrolPerson(
        self, request: registry_pb2.EnrolPersonRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        """Register, issue, activate, set the PIN and credit the opening balance as one
        command. Before anything is sent: the checks of `_enrolment`, then the PIN's
        verification value from the HSM, as ChangePin gets it."""
        method = "EnrolPerson"
        refused = self._bounded(request)
        if refused is not None:
            return refused
        request_id = request.window.request_id
        code, make, detail = self._enrolment(request)
        pvv = ""
        if code == ResultCode.OK:
            found = await self._pvv(
                request.window.window_id, request.new_pin_block, request.card_no
            )
            code, pvv = (found, "") if isinstance(found, ResultCode) else (code, found)
        if code != ResultCode.OK:
            metrics.GATEWAY_RESULTS.labels(method, code.name).inc()
            return self._refused(request_id, code, detail)
        return await self._run(
            method,
            request,
            request.ssn,
            "",
            lambda rid, at_ms, ssn: make(rid, at_ms, ssn, pvv),
        )

    async def EnrolPersons(
        self, request: registry_pb2.EnrolPersonsRequest, context: Ctx
    ) -> registry_pb2.EnrolPersonsReply:
        """Bulk enrolment: each person decided as by EnrolPerson, all or nothing per
        person. The checks of every person first, then one HSM SetPins call for the PINs
        of a window, then every command at once; the replies in order."""
        method = "EnrolPersons"
        started = time.perf_counter()
        persons = list(request.persons)
        if len(persons) > bounds.ENROL_BATCH_MAX:
            await status.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {bounds.ENROL_BATCH_MAX} persons in one call",
                status.Reason.FIELD_INVALID,
                bad_field="persons",
            )
        replies: dict[int, registry_pb2.RegistryReply] = {}
        makes: dict[int, MakeEnrolment] = {}
        claimed: dict[str, str] = {}  # card number → the ssn of this batch that takes it
        for i, person in enumerate(persons):
            checked = self._enrolment_checked(method, person)
            if isinstance(checked, registry_pb2.RegistryReply):
                replies[i] = checked
            elif claimed.setdefault(person.card_no, person.ssn) != person.ssn:
                # two persons of one batch with one card: the card index cannot know yet
                metrics.GATEWAY_RESULTS.labels(method, ResultCode.CARD_EXISTS.name).inc()
                replies[i] = self._refused(person.window.request_id, ResultCode.CARD_EXISTS)
            else:
                makes[i] = checked
        pvvs = await self._batch_pvvs(method, persons, makes, replies)
        at_ms = self.clock()
        asked = {
            i: make(persons[i].window.request_id, at_ms, persons[i].ssn, pvvs.get(i, ""))
            for i, make in makes.items()
        }
        decided = await asyncio.gather(*(self._ask(command) for command in asked.values()))
        for i, reply in zip(asked, decided, strict=True):
            replies[i] = self._answer(
                method, persons[i].window.request_id, reply, persons[i].ssn, ""
            )
        metrics.GATEWAY_SECONDS.labels(method).observe(time.perf_counter() - started)
        return registry_pb2.EnrolPersonsReply(replies=[replies[i] for i in range(len(persons))])

    def _enrolment_checked(
        self, method: str, person: registry_pb2.EnrolPersonRequest
    ) -> registry_pb2.RegistryReply | MakeEnrolment:
        """One person of a batch: its refusal, or how to make its command."""
        detail = _request_fault(person, "persons.")
        if detail is not None:
            code = ResultCode.MALFORMED_REQUEST
        else:
            code, make, detail = self._enrolment(person)
            if code == ResultCode.OK:
                return make
        metrics.GATEWAY_RESULTS.labels(method, code.name).inc()
        return self._refused(person.window.request_id, code, detail)

    async def _batch_pvvs(
        self,
        method: str,
        persons: list[registry_pb2.EnrolPersonRequest],
        makes: dict[int, MakeEnrolment],
        replies: dict[int, registry_pb2.RegistryReply],
    ) -> dict[int, str]:
        """The verification values of the new PINs of the persons still in `makes`, one
        SetPins call per window; a person whose PIN the HSM refuses leaves `makes` for
        `replies`. Empty without an HSM (terminal security off)."""
        if self.hsm is None:
            return {}
        by_window: dict[str, list[int]] = {}
        for i in makes:
            by_window.setdefault(persons[i].window.window_id, []).append(i)
        pvvs: dict[int, str] = {}
        for window_id, chosen in by_window.items():
            found = await self.hsm.set_pins(
                window_id, [(persons[i].new_pin_block, persons[i].card_no) for i in chosen]
            )
            for i, (code, pvv) in zip(chosen, found, strict=True):
                if code == ResultCode.OK:
                    pvvs[i] = pvv
                    continue
                del makes[i]
                metrics.GATEWAY_RESULTS.labels(method, code.name).inc()
                replies[i] = self._refused(persons[i].window.request_id, code)
        return pvvs

    async def CreditAccount(
        self, request: registry_pb2.CreditRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._run(
            "CreditAccount",
            request,
            request.ssn,
            "",
            lambda rid, at, ssn: model.CreditAccount(
                rid, at, ssn, request.amount_fen, request.source_id
            ),
        )

    async def ApplyReplacement(
        self, request: registry_pb2.CardRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._card_op("ApplyReplacement", "apply_replacement")(request, context)

    async def IssueReplacement(
        self, request: registry_pb2.IssueReplacementRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._replace("IssueReplacement", request, "replacement")

    async def ChangeCard(
        self, request: registry_pb2.IssueReplacementRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._replace("ChangeCard", request, "change")

    async def _replace(
        self, method: str, request: registry_pb2.IssueReplacementRequest, mode: str
    ) -> registry_pb2.RegistryReply:
        return await self._run(
            method,
            request,
            request.ssn,
            request.old_card_no,
            lambda rid, at, ssn: model.ReplaceCard(
                rid, at, ssn, request.old_card_no, request.new_card_no, mode
            ),
        )

    async def Cancel(
        self, request: registry_pb2.CancelRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._run(
            "Cancel",
            request,
            request.ssn,
            "",
            lambda rid, at, ssn: model.CancelPerson(rid, at, ssn, request.reason),
        )

    async def SetPharmacyDailyLimit(
        self, request: registry_pb2.SetLimitRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._run(
            "SetPharmacyDailyLimit",
            request,
            request.ssn,
            request.card_no,
            lambda rid, at, ssn: model.SetPharmacyLimit(
                rid, at, ssn, request.card_no, request.pharmacy_swipes_per_day
            ),
        )

    async def SetPhone(
        self, request: registry_pb2.SetPhoneRequest, context: Ctx
    ) -> registry_pb2.RegistryReply:
        return await self._run(
            "SetPhone",
            request,
            request.ssn,
            "",
            lambda rid, at, ssn: model.SetPhone(rid, at, ssn, request.phone),
        )

    async def GetPerson(
        self, request: registry_pb2.GetPersonRequest, context: Ctx
    ) -> registry_pb2.PersonView:
        """Cards and recent transactions, read through the person's own worker (so the
        view is ordered with every operation on that person)."""
        detail = bounds.oversized(request)
        if detail is not None:
            code = ResultCode.MALFORMED_REQUEST
            return registry_pb2.PersonView(result=result_pb(code), message=message(code, detail))
        ssn = request.ssn
        refused = ResultCode.CARD_UNKNOWN if request.card_no else ResultCode.MALFORMED_REQUEST
        if not ssn and request.card_no:
            ssn, found = await self.cards.owner_of(request.card_no)
            if found == ResultCode.UNAVAILABLE:  # a full index lacks it: not known unknown
                refused = found
        if not ssn or not validate.is_ssn(ssn):
            return registry_pb2.PersonView(result=result_pb(refused))
        request_id = request.window.request_id or f"query-{self.clock()}"
        reply = await self._ask(model.QueryPerson(request_id, self.clock(), ssn))
        person = reply.snapshot
        if person is None:
            return registry_pb2.PersonView(result=result_pb(reply.result))
        return person_view(person, reply)


def person_view(person: model.Person, reply: Reply) -> registry_pb2.PersonView:
    records = [
        (
            s.at_ms,
            registry_pb2.Transaction(
                request_id=s.request_id,
                card_no=s.card_no,
                institution_id=s.institution_id,
                paid_from_account_fen=s.paid_from_account_fen,
                refunded_fen=s.refunded_fen,
                reversed=s.reversed,
                at=shanghai_iso(s.at_ms),
                kind="consumption",
            ),
        )
        for s in person.swipes
    ] + [
        (
            c.at_ms,
            registry_pb2.Transaction(
                request_id=c.source_id,
                credited_fen=c.amount_fen,
                at=shanghai_iso(c.at_ms),
                kind="allocation",
            ),
        )
        for c in person.credits
    ]
    records.sort(key=lambda r: r[0], reverse=True)  # newest first
    transactions = [t for _at, t in records[:RECENT_TRANSACTIONS_MAX]]
    cards = [
        common_pb2.CardInfo(
            card_no=c.card_no,
            kind=pb_enum(c.kind),
            colour=pb_enum(c.colour),
            state=pb_enum(c.state),
            initial_pin=c.initial_pin,
            pin_tries_remaining=c.pin_tries_remaining,
            pharmacy_swipes_per_day=c.pharmacy_swipes_per_day,
            pre_loss_deadline=shanghai_iso(c.pre_loss_deadline_ms)
            if c.state == CardState.PRE_LOST
            else "",
            issued_at=shanghai_iso(c.issued_at_ms),
            expires_at=shanghai_iso(c.expires_at_ms) if c.expires_at_ms else "",
        )
        for c in person.cards
    ]
    return registry_pb2.PersonView(
        result=result_pb(reply.result),
        state=state_of(person.ssn, reply),
        name=person.name,
        category=pb_enum(person.category),
        balance_fen=person.balance_fen,
        cards=cards,
        phone=mask_phone(person.phone),
        region=person.region,
        cancelled=person.cancelled,
        transactions=transactions,
    )


def run(
    kafka: KafkaAccess,
    host: str,
    port: int,
    deadline_ms: int,
    instance_id: str,
    hsm_address: str = "",
    pki_dir: Path | None = None,
) -> None:
    """Serve CardRegistryService on host:port until terminated (PINs set through the HSM
    when an HSM address is given; mutual TLS and roles with a PKI)."""
    policy = load_policy(get_settings())
    asyncio.run(
        serve_commands(
            "registry",
            kafka,
            instance_id,
            f"{host}:{port}",
            registry_pb2.DESCRIPTOR.services_by_name["CardRegistryService"].full_name,
            lambda requests, cards, server: (
                registry_pb2_grpc.add_CardRegistryServiceServicer_to_server(
                    CardRegistry(
                        requests,
                        cards,
                        deadline_ms,
                        hsm_address=hsm_address,
                        pki_dir=pki_dir,
                        policy=policy,
                    ),
                    server,
                )
            ),
            pki_dir,
        )
    )
