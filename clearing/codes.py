"""Enums of the domain, numbered exactly as proto/medclear/v1/common.proto.

The core does not import generated protobuf code; tests/unit/test_codes.py checks that
every name and number here matches the proto, so the two cannot drift apart.
"""

from __future__ import annotations

from enum import IntEnum


class ResultCode(IntEnum):
    """Why a request was answered so. Declines are numbered in the order they are
    checked: when several rules apply, the lowest number is reported."""

    RESULT_CODE_UNSPECIFIED = 0
    OK = 1
    PARTIALLY_APPROVED = 2

    MALFORMED_REQUEST = 10
    MAC_INVALID = 11
    PIN_BLOCK_INVALID = 12
    CRYPTOGRAM_INVALID = 13
    TERMINAL_UNKNOWN = 14

    INSTITUTION_UNKNOWN = 20
    INSTITUTION_NOT_DESIGNATED = 21

    CARD_UNKNOWN = 30
    CARD_NOT_ACTIVATED = 31
    CARD_PRE_LOST = 32
    CARD_LOST = 33
    CARD_LOCKED = 34
    CARD_FROZEN = 35
    CARD_CANCELLED = 36
    CARD_EXPIRED = 37
    CARD_SUPERSEDED = 38
    COLOUR_NOT_ALLOWED = 39

    INITIAL_PIN_NOT_CHANGED = 50
    PIN_WRONG = 51
    PIN_TRIES_EXCEEDED = 52

    DAILY_PHARMACY_LIMIT_REACHED = 60
    INSUFFICIENT_BALANCE = 61
    AMOUNT_OUT_OF_RANGE = 62

    TRANSITION_NOT_ALLOWED = 70
    RELEASE_AFTER_FORMAL_LOSS = 71
    RELEASE_AFTER_REPLACEMENT = 72
    TEMPORARY_CARD_WHILE_SOCIAL_VALID = 73
    PERSON_UNKNOWN = 74
    PERSON_EXISTS = 75
    CARD_EXISTS = 76
    PIN_CHANGE_NOT_ALLOWED_HERE = 77

    ORIGINAL_NOT_FOUND = 90
    ORIGINAL_DECLINED = 91
    ALREADY_REVERSED = 92
    REFUND_EXCEEDS_PAID = 93

    TIMEOUT = 100
    UNAVAILABLE = 101
    SYSTEM_ERROR = 102

    @property
    def approved(self) -> bool:
        return self in (ResultCode.OK, ResultCode.PARTIALLY_APPROVED)


class CardKind(IntEnum):
    CARD_KIND_UNSPECIFIED = 0
    SOCIAL_SECURITY = 1
    TEMPORARY = 2


class CardColour(IntEnum):
    CARD_COLOUR_UNSPECIFIED = 0
    BLUE = 1
    GREEN = 2
    RED = 3


class InsuranceCategory(IntEnum):
    INSURANCE_CATEGORY_UNSPECIFIED = 0
    EMPLOYEE = 1
    RESIDENT = 2
    SPECIAL = 3


class CardState(IntEnum):
    CARD_STATE_UNSPECIFIED = 0
    ISSUED = 1
    ACTIVE = 2
    PRE_LOST = 3
    LOST = 4
    LOCKED = 5
    FROZEN = 6
    REPLACED = 7
    CANCELLED = 8
    EXPIRED = 9
    SUPERSEDED = 10


class InstitutionType(IntEnum):
    INSTITUTION_TYPE_UNSPECIFIED = 0
    HOSPITAL = 1
    CLINIC = 2
    PHARMACY = 3


COLOUR_OF_CATEGORY = {
    InsuranceCategory.EMPLOYEE: CardColour.BLUE,
    InsuranceCategory.RESIDENT: CardColour.GREEN,
    InsuranceCategory.SPECIAL: CardColour.RED,
}

# The decline a swipe gets for a card in each state other than ACTIVE.
DECLINE_OF_CARD_STATE = {
    CardState.ISSUED: ResultCode.CARD_NOT_ACTIVATED,
    CardState.PRE_LOST: ResultCode.CARD_PRE_LOST,
    CardState.LOST: ResultCode.CARD_LOST,
    CardState.LOCKED: ResultCode.CARD_LOCKED,
    CardState.FROZEN: ResultCode.CARD_FROZEN,
    CardState.REPLACED: ResultCode.CARD_LOST,
    CardState.CANCELLED: ResultCode.CARD_CANCELLED,
    CardState.EXPIRED: ResultCode.CARD_EXPIRED,
    CardState.SUPERSEDED: ResultCode.CARD_SUPERSEDED,
}

MESSAGES: dict[ResultCode, str] = {
    ResultCode.OK: "交易成功 / approved",
    ResultCode.PARTIALLY_APPROVED: "部分支付，余额不足部分付现金 / partial, rest in cash",
    ResultCode.MALFORMED_REQUEST: "请求格式错误 / malformed request",
    ResultCode.MAC_INVALID: "报文校验失败 / MAC invalid",
    ResultCode.PIN_BLOCK_INVALID: "密码块格式错误 / PIN block invalid",
    ResultCode.CRYPTOGRAM_INVALID: "卡片认证失败 / card authentication failed",
    ResultCode.TERMINAL_UNKNOWN: "终端未登记 / terminal unknown",
    ResultCode.INSTITUTION_UNKNOWN: "机构不存在 / institution unknown",
    ResultCode.INSTITUTION_NOT_DESIGNATED: "非定点机构 / institution not designated",
    ResultCode.CARD_UNKNOWN: "卡号不存在 / card unknown",
    ResultCode.CARD_NOT_ACTIVATED: "卡未启用 / card not activated",
    ResultCode.CARD_PRE_LOST: "卡已预挂失 / card reported lost (pre-loss)",
    ResultCode.CARD_LOST: "卡已挂失 / card lost",
    ResultCode.CARD_LOCKED: "密码已锁定 / card locked",
    ResultCode.CARD_FROZEN: "账户已冻结 / account frozen",
    ResultCode.CARD_CANCELLED: "卡已注销 / card cancelled",
    ResultCode.CARD_EXPIRED: "卡已过期 / card expired",
    ResultCode.CARD_SUPERSEDED: "临时卡已作废 / temporary card superseded",
    ResultCode.COLOUR_NOT_ALLOWED: "此卡不能在本机构使用 / card not allowed here",
    ResultCode.INITIAL_PIN_NOT_CHANGED: "请先修改初始密码 / change the initial PIN first",
    ResultCode.PIN_WRONG: "密码错误 / wrong PIN",
    ResultCode.PIN_TRIES_EXCEEDED: "密码错误次数过多，卡已锁定 / too many wrong PINs, locked",
    ResultCode.DAILY_PHARMACY_LIMIT_REACHED: "已达当日药店刷卡次数上限 / daily pharmacy limit",
    ResultCode.INSUFFICIENT_BALANCE: "余额不足 / insufficient balance",
    ResultCode.AMOUNT_OUT_OF_RANGE: "金额超出范围 / amount out of range",
    ResultCode.TRANSITION_NOT_ALLOWED: "当前卡状态不允许此操作 / not allowed in this card state",
    ResultCode.RELEASE_AFTER_FORMAL_LOSS: "已正式挂失，不能解挂 / formal loss cannot be released",
    ResultCode.RELEASE_AFTER_REPLACEMENT: "已申请补卡，不能解挂 / replacement applied, no release",
    ResultCode.TEMPORARY_CARD_WHILE_SOCIAL_VALID: "社保卡有效，不能办理临时卡 / social card valid",
    ResultCode.PERSON_UNKNOWN: "参保人不存在 / person unknown",
    ResultCode.PERSON_EXISTS: "参保人已存在 / person exists",
    ResultCode.CARD_EXISTS: "卡号已存在 / card exists",
    ResultCode.PIN_CHANGE_NOT_ALLOWED_HERE: "定点机构不能修改密码 / PIN change not allowed here",
    ResultCode.ORIGINAL_NOT_FOUND: "原交易不存在 / original not found",
    ResultCode.ORIGINAL_DECLINED: "原交易未成功 / original was declined",
    ResultCode.ALREADY_REVERSED: "原交易已冲正 / already reversed",
    ResultCode.REFUND_EXCEEDS_PAID: "退费金额超过原支付金额 / refund exceeds amount paid",
    ResultCode.TIMEOUT: "交易超时，请冲正 / timeout, outcome unknown: reverse",
    ResultCode.UNAVAILABLE: "系统暂不可用 / unavailable",
    ResultCode.SYSTEM_ERROR: "系统错误 / system error",
}


def message_of(code: ResultCode) -> str:
    return MESSAGES.get(code, code.name)
