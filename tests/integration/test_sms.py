"""The consumption SMS against real parts: a broker, the npm `smpp` package's SMSC on
loopback (tests/support/smsc/server.js), and the sms job as a process (`medclear serve
sms`). Events are published straight to `medclear.events`, as the clearing worker would.

Each test gets its own broker, SMSC and job (medclear.bench.sms.SmsRig)."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from medclear.bench.sms import SmsRig, now_ms, person, phone_of, swipe
from medclear.infra.policy import load_institutions
from stream_jobs.sms import SMS_IN_FLIGHT_MAX

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.smsc,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js for the SMSC"),
]

LONG_NAME_INSTITUTION = "310101H99999"
LONG_NAME = "上海交通大学医学院附属瑞金医院国家医学中心浦东新区分院特需医疗部门诊药房"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[SmsRig]:
    institutions = tmp_path / "institutions.csv"
    rows = ["institution_id,name,type,designated"]
    rows += [f"{i.institution_id},{i.name},{i.type.name},1" for i in load_institutions().values()]
    rows.append(f"{LONG_NAME_INSTITUTION},{LONG_NAME},HOSPITAL,1")
    institutions.write_text("\n".join(rows) + "\n", encoding="utf-8")
    rig = SmsRig(tmp_path / "rig", institutions_file=institutions)
    try:
        yield rig.start()
    finally:
        rig.stop()


def by_destination(messages: list[dict[str, object]]) -> Counter[tuple[object, object]]:
    return Counter((m["destination"], m["text"]) for m in messages)


def test_swipe_sends_one_intact_sms_long_ones_in_parts_and_redelivery_sends_none(
    rig: SmsRig,
) -> None:
    t0 = now_ms()
    persons = [person(1, t0), person(2, t0), person(3, t0, phone="")]  # 3 opted out
    short = swipe(1, 1, t0 + 1)
    long = swipe(2, 2, t0 + 2, institution=LONG_NAME_INSTITUTION)
    silent = swipe(3, 3, t0 + 3)
    rig.publish([*persons, short, short, long, silent])  # twice in one batch, too
    messages = rig.wait_messages(2)
    assert len(messages) == 2, messages

    first = next(m for m in messages if m["destination"] == "86" + phone_of(1))
    assert first["text"].startswith("【医保】您尾号0001的社保卡于")
    assert first["text"].endswith("在老百姓大药房第1分店医保个人账户支出35.20元，余额9999.99元。")
    assert first["parts"] == 1 and first["data_coding"] == 8

    second = next(m for m in messages if m["destination"] == "86" + phone_of(2))
    assert second["parts"] == 2 and second["esm_class"] & 0x40
    assert f"在{LONG_NAME}医保个人账户支出35.20元，余额9999.98元。" in second["text"]
    assert len(second["text"]) > 70

    # the same events delivered again (a clearing worker's redelivery), then a marker
    rig.publish([*persons, short, long, silent, swipe(4, 1, t0 + 4)])
    messages = rig.wait_messages(3)
    time.sleep(1.0)
    messages = rig.messages()
    assert len(messages) == 3, messages
    assert max(by_destination(messages).values()) == 1

    outcomes = rig.outcomes()
    submitted = [r for r in outcomes if r["outcome"] == "submitted"]
    assert sorted(r["event_id"] for r in submitted) == sorted(
        [short.event_id, long.event_id, "bench-T1:00000004#0"]
    )
    assert {r["event_id"] for r in outcomes if r["outcome"] == "no_phone"} == {silent.event_id}
    assert all("139" not in r["phone_masked"][3:] for r in outcomes)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # receipts (one per part) come back as outcomes
        receipts = [r for r in rig.outcomes() if r["outcome"] == "receipt"]
        if len(receipts) >= 4:
            break
        time.sleep(0.5)
    assert {r["status"] for r in receipts} == {"DELIVRD"}
    assert {r["event_id"] for r in receipts} >= {short.event_id, long.event_id}


def test_smsc_stopped_and_restarted_loses_and_doubles_nothing(rig: SmsRig) -> None:
    count = 60
    t0 = now_ms()
    rig.publish(person(n, t0) for n in range(count))
    rig.publish(swipe(n, n, t0 + n) for n in range(20))
    assert len(rig.wait_messages(20)) == 20

    rig.stop_smsc()
    rig.publish(swipe(n, n, now_ms()) for n in range(20, 40))  # while the SMSC is down
    time.sleep(3.0)  # the job retries with back-off meanwhile
    rig.start_smsc()
    assert len(rig.wait_messages(40, timeout_s=60)) == 40

    # down again, and now the job is stopped (SIGTERM) while it holds an unsent batch
    rig.stop_smsc()
    rig.publish(swipe(n, n, now_ms()) for n in range(40, count))
    time.sleep(1.0)
    assert rig.job is not None
    rig.job.stop()
    rig.start_smsc()
    rig.start_job()

    messages = rig.wait_messages(count, timeout_s=60)
    time.sleep(1.0)
    messages = rig.messages()
    assert sorted(m["destination"] for m in messages) == sorted(
        "86" + phone_of(n) for n in range(count)
    )
    assert max(by_destination(messages).values()) == 1


def test_job_killed_and_restarted_loses_nothing_and_doubles_at_most_the_window(
    rig: SmsRig,
) -> None:
    count = 300
    t0 = now_ms()
    rig.publish(person(n, t0) for n in range(count))
    rig.publish(swipe(n, n, t0 + n) for n in range(count))
    deadline = time.monotonic() + 60
    while len(rig.messages()) < count // 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    rig.kill_job()  # mid-run
    killed_at = len(rig.messages())
    assert 0 < killed_at < count, "kill -9 did not land mid-run; make the run longer"
    rig.start_job()

    wanted = {"86" + phone_of(n) for n in range(count)}
    rig.wait_destinations(wanted, timeout_s=90)
    time.sleep(1.0)  # a double would come within it
    messages = rig.messages()
    sent = Counter(m["destination"] for m in messages)
    missing = wanted - set(sent)
    missing_ids = {f"bench-T1:{int(d[-8:]):08d}#0" for d in missing}
    missing_outcomes = [r for r in rig.outcomes() if r["event_id"] in missing_ids]
    assert not missing, f"lost: {sorted(missing)}; their outcomes: {missing_outcomes}"
    doubled = {d for d, c in sent.items() if c > 1}
    assert all(c <= 2 for c in sent.values())
    assert len(doubled) <= SMS_IN_FLIGHT_MAX
    # every doubled SMS is one the restarted job itself flagged as a resend after a crash
    flagged = {r["event_id"] for r in rig.outcomes() if r["resent_uncertain"]}
    doubled_ids = {f"bench-T1:{int(d[-8:]):08d}#0" for d in doubled}
    assert doubled_ids <= flagged
