-- Abnormal transactions (medclear.alerts, clearing/abnormal.py) and what became of each
-- SMS (medclear.sms-outcomes, stream_jobs/sms.py), written by the ClickHouse sink's
-- side feeds. One row per alert id / per (event id, outcome, instant), whatever the
-- redeliveries: ReplacingMergeTree, read FINAL where exactness matters. Tokens and masked
-- numbers only, as in `events`.
CREATE TABLE IF NOT EXISTS alerts
(
    alert_id String,
    kind String,
    at DateTime('Asia/Shanghai'),
    at_ms UInt64,
    day Date,
    person_ref String,
    card_ref String,
    card_masked String,
    institution_id String,
    terminal_id String,
    cardholder_facing UInt8,
    detail String,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(day)
ORDER BY alert_id;

CREATE TABLE IF NOT EXISTS sms_outcomes
(
    event_id String,
    outcome String,
    at DateTime('Asia/Shanghai'),
    at_ms UInt64,
    day Date,
    kind String,
    event_at_ms UInt64,
    phone_masked String,
    parts UInt16,
    smsc_message_ids String,
    resent_uncertain UInt8,
    status String,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(day)
ORDER BY (event_id, outcome, at_ms);
