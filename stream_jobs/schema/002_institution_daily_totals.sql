-- Reconciliation per institution per Beijing day, over `events FINAL`: correct before
-- merges, so a redelivered event never doubles a sum (a materialised view into a
-- SummingMergeTree would add every duplicate insert).
--
-- `day` here is the settlement day: the swipe's own day for approvals, the day of the
-- swipe it undoes for reversals (original_day), the day of the refund for refunds.
-- net_fen = paid from the account − returned by reversals − refunded: what the fund owes
-- the institution for that day, before settlement's cut-off rules (stream_jobs/settlement).
-- stream_jobs/ch.py daily_totals() runs the same select with its filter inside.
CREATE VIEW IF NOT EXISTS institution_daily_totals AS
SELECT
    settle_day AS day,
    institution_id,
    countIf(event_type = 'SwipeApproved') AS approved_count,
    sumIf(amount_fen, event_type = 'SwipeApproved') AS approved_amount_fen,
    sumIf(paid_from_account_fen, event_type = 'SwipeApproved') AS approved_account_fen,
    countIf(event_type = 'SwipeReversed') AS reversed_count,
    sumIf(amount_fen, event_type = 'SwipeReversed') AS reversed_fen,
    countIf(event_type = 'Refunded') AS refunded_count,
    sumIf(amount_fen, event_type = 'Refunded') AS refunded_fen,
    approved_account_fen - reversed_fen - refunded_fen AS net_fen
FROM
(
    SELECT original_day AS settle_day, institution_id, event_type, amount_fen,
           paid_from_account_fen
    FROM events FINAL
    WHERE event_type IN ('SwipeApproved', 'SwipeReversed', 'Refunded')
)
GROUP BY settle_day, institution_id;
