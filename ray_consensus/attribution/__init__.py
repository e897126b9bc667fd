"""The attribution stage on Ray: windows of shards decoded once by Ray Data, explained by slots
that hold one member at a time, dispatched by the driver.
"""
