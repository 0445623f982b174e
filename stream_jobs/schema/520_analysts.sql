-- For analysts: the names behind the codes, and the log in yuan.
--
-- result_codes and institution_types are filled from clearing/codes.py by
-- stream_jobs/ch.py sync_lookups() after every migration run (one row per code; a
-- re-sync replaces, so read them FINAL). Join them on events.result and
-- events.institution_type; ClickHouse 18.16 takes one JOIN per SELECT, so nest a second
-- one (tests/integration/test_clickhouse_sink.py has the query).
CREATE TABLE IF NOT EXISTS result_codes
(
    code UInt16,
    name String,
    message String,
    approved UInt8
)
ENGINE = ReplacingMergeTree()
ORDER BY code;

CREATE TABLE IF NOT EXISTS institution_types
(
    type UInt8,
    name String
)
ENGINE = ReplacingMergeTree()
ORDER BY type;

-- events in yuan, one row per event id (FINAL), for reading and charting: the amounts
-- are rounded Float64 yuan. Sums that must be exact use the *_fen columns of `events`.
CREATE VIEW IF NOT EXISTS events_yuan AS
SELECT
    event_id,
    event_type,
    at,
    day,
    original_day,
    institution_id,
    institution_type,
    card_masked,
    request_id,
    result,
    round(amount_fen / 100, 2) AS amount_yuan,
    round(paid_from_account_fen / 100, 2) AS paid_from_account_yuan,
    round(paid_in_cash_fen / 100, 2) AS paid_in_cash_yuan,
    round(balance_after_fen / 100, 2) AS balance_after_yuan
FROM events FINAL;
