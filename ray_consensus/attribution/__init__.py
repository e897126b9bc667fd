"""The attribution stage on Ray: windows of shards decoded once by Ray Data, explained by slots
that hold one member at a time, dispatched by the driver.

    ShardTask ─► Ray Data: DecodeShard (CPU tasks) ─► a window of decoded shards in the object store
                                                             │
                           Slot 1: member a, then member c, … ┤  (each slot holds one member at a time
                           Slot 2: member b, then member d, … ┘   on its GPU or CPU share)
                                                             ▼
                                  attributions/model=…/shard=…  ─► ShardDone ─► the shard's reduce

One module per part: `records` (the records between the parts and the run's events),
`decode_stage` (Ray Data's CPU tasks), `slot` (the actor that explains), `dispatch` (the driver's
`Dispatcher`, whose run yields the events the runner reads in one loop beside the reduce tasks).
"""
