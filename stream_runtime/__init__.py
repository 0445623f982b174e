"""medclear's stream runtime: consumer groups, batches, per-partition state and its
changelog, on aiokafka's public API only.

Every job whose loss costs money or an SMS runs on it (the clearing worker, settlement,
the sms job, the pre-loss timer, the abnormal-transaction job). It replaces faust-streaming,
whose record loss after a restart and early producer flush medclear could only stop by
patching faust's private code (docs/ARCHITECTURE.md, decision 2).

- `store.PartitionStore`: one RocksDB per table partition; the next changelog offset to
  apply is written in the same write batch as the values, so a restart that keeps its
  disk reads only the changelog's tail.
- `changelog.restore`: a partition's changelog read into its store in bulk: chunks of
  thousands of records, one write batch each, one partition at a time (memory is bounded
  by the chunk, whatever the changelog's size).
- `runtime.Runtime`: the consumer group (static membership, manual commits only; the
  broker holds an empty fetch, so an idle job neither spins nor waits), the
  rebalance listener (revocation: the batches in flight are finished and committed;
  assignment: state restored before any record is handled), and the batch pipeline:
  per batch, outputs acknowledged → state (changelog acknowledged, then the store) →
  replies → commit; the next batch is decided while this one's acknowledgements are
  pending.
"""
