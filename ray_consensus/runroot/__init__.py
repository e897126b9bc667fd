"""What a run root holds: the units of work and their completion markers (`units`), every stored
table's columns and types (`contract`), and how the last run ended (`status`).
"""
