"""From stored maps to figures, in plain numpy: the consensus math (`consensus`), the correlations
across the committee and their uncertainty (`correlation`), each shard's reduce (`reduce`) and the
run-level tables from per-shard aggregates (`tables`).
"""
