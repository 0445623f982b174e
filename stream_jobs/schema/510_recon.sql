-- Reconciliation (对账): the files institutions send, as imported by `medclear recon import`
-- (medclear/cli_recon.py). Runs on ClickHouse 18.16 and current releases.
--
-- A file may be imported again (corrected): every row carries the import's instant
-- `imported_at_ms`, and readers take, per institution and day, only the rows of the
-- latest import (`argMax` / a max per key), so an old import never mixes with a new one
-- and nothing depends on merges. Money is integer fen (the files carry yuan with two
-- decimals, parsed exactly).
CREATE TABLE IF NOT EXISTS institution_totals
(
    institution_id String,
    day Date,
    count UInt32,
    total_fen Int64,
    account_fen Int64,
    source_file String,
    line UInt32,
    imported_at_ms UInt64
)
ENGINE = ReplacingMergeTree(imported_at_ms)
PARTITION BY toYYYYMM(day)
ORDER BY (institution_id, day);

CREATE TABLE IF NOT EXISTS institution_details
(
    institution_id String,
    day Date,
    request_id String,
    kind String,
    amount_fen Int64,
    account_fen Int64,
    source_file String,
    line UInt32,
    imported_at_ms UInt64
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(day)
ORDER BY (institution_id, day, request_id, kind, imported_at_ms);
