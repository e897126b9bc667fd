"""Before any cluster work: checks that fail fast (`preflight`), the plan of units and fingerprints
(`plan`), the slots that fit the cluster (`schedule`) and joining the cluster (`cluster`).
"""
