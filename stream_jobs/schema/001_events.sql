-- The event log: one row per published event (clearing.model.Event), written by
-- stream_jobs/clickhouse_sink.py. Runs on ClickHouse 18.16 and current releases.
--
-- Exactly one row per event id: the sink may insert an event more than once (a batch
-- retried after a timeout, a redelivery after a restart); duplicates carry the same
-- event_id, hence the same day and partition, and ReplacingMergeTree keeps one of them
-- at merge time. Queries that must be exact before a merge read `events FINAL` (see
-- the views in 002 and stream_jobs/ch.py).
--
-- No card number or social security number in clear: person_ref / card_ref are keyed
-- tokens (medclear.tokens), ssn_masked / card_masked keep a few digits for people.
-- Money is integer fen; `at` is the second in Beijing time, `at_ms` the exact instant.
CREATE TABLE IF NOT EXISTS events
(
    event_id String,
    event_type String,
    at DateTime('Asia/Shanghai'),
    at_ms UInt64,
    day Date,
    person_ref String,
    ssn_masked String,
    card_ref String,
    card_masked String,
    request_id String,
    original_request_id String,
    institution_id String,
    institution_type UInt8,
    amount_fen Int64,
    paid_from_account_fen Int64,
    paid_in_cash_fen Int64,
    balance_after_fen Int64,
    result UInt16,
    original_day Date,
    detail String,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(day)
ORDER BY event_id;
