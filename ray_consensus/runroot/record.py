"""run.json as a record: what a run was asked to do, what it planned, how it ended.

`RunRecord.save` is the only writer of run.json and `RunRecord.load` the only reader; the JSON
they exchange is `to_dict` / `from_dict`, key for key what earlier versions wrote, so a run root
of 0.1.0 loads (it lacks `class_names`, `driver` and three plan counts: they load as None and
are not written back). Nothing here imports torch or Ray.

    status          running | complete | failed | interrupted
    updated         when the record was last written (UTC, ISO 8601, seconds)
    spec            the resolved spec, secrets masked ("***")
    plan            `PlanSummary`: images, shards, units to compute, passes [, schedule]
    class_names     the data set's class folders in label order (a table manifest: [])
    versions        package -> version of the driver's environment
    driver          the lease holder (host, pid, run_id) of the run that wrote it
    units_computed  `UnitCounts` (complete runs)
    units_skipped   `UnitCounts` (complete runs)
    counts          `RunCounts` (complete runs)
    timings         stage -> seconds (attributions_s, reduce_s, tables_s, total_s, ...) (complete runs)
    error           the first line of what stopped a failed or interrupted run
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

from ray_consensus.errors import SpecError
from ray_consensus.spec.config import RunSpec, parse_spec
from ray_consensus.storage.store import Store

RUN_FILE = "run.json"


def now() -> str:
    """The time a record is written: UTC, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _without_none(record) -> dict:
    """A record's fields as JSON data, fields that are None left out (records nest as dicts)."""
    out = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if value is not None:
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
    return out


@dataclass(frozen=True, kw_only=True)
class PlanSummary:
    """The plan's counts (`Plan.summary`), as run.json's `plan` and `validate --json` show them.

    The three fields after `reduce_units_to_compute` are None in run roots written before 0.2.0;
    `schedule` is the schedule's description where the run had something to place on the cluster
    (`validate` always says one)."""

    images: int
    shards: int
    models: int
    classes: int
    manifest_errors: int                        # rows rejected while listing the data set
    attribution_units: int                      # shards x members
    attribution_units_to_compute: int
    reduce_units_to_compute: int
    damaged_units: int | None = None            # stored units whose files are not those their marker vouches for
    shards_to_remove: int | None = None         # shards whose every image left the data set
    members_not_in_committee: list[str] | None = None  # their attributions stay in the run root
    forward_passes: int
    backward_passes: int
    schedule: str | None = None

    def to_dict(self) -> dict:
        return _without_none(self)

    @classmethod
    def from_dict(cls, data: dict) -> PlanSummary:
        """Raises ValueError where a count every version wrote is missing."""
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"its plan has no {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def others_note(self) -> str:
        """A line on the members in `members_not_in_committee`, for `validate` and `run`."""
        return (f"attributions of {', '.join(self.members_not_in_committee or [])} (not in the committee) stay in "
                f"the run root: reading attributions/ returns their rows, and a member that comes back computes "
                f"nothing again; delete attributions/model=<id>/ to drop one")


@dataclass(frozen=True)
class UnitCounts:
    """Attribution units (member x shard) and reduce units (shards)."""

    attributions: int
    reduce: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunCounts:
    """What a complete run holds: images, shards, members, error rows (`contract.count_errors`), voted images."""

    images: int
    shards: int
    models: int
    errors: int
    voted: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """A run root's run.json (see the module docstring for the fields). `spec_data` is the spec as
    stored; `spec` parses it (secrets masked in storage come back unset: the AWS variables or the
    caller supply them)."""

    status: str
    updated: str = field(default_factory=now)
    spec_data: dict
    plan: PlanSummary
    class_names: list[str] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    driver: dict | None = None
    units_computed: UnitCounts | None = None
    units_skipped: UnitCounts | None = None
    counts: RunCounts | None = None
    timings: dict[str, float] | None = None
    error: str | None = None

    @functools.cached_property
    def spec(self) -> RunSpec:
        data = dict(self.spec_data)
        data["storage"] = {k: v for k, v in (data.get("storage") or {}).items() if v != "***"}
        return parse_spec(data)

    def updated_to(self, status: str, **changes) -> RunRecord:
        """This record with another status (and `changes`), written now."""
        return dataclasses.replace(self, status=status, updated=now(), **changes)

    @property
    def run_id(self) -> str | None:
        """The id of the run that wrote this record (its lease's; None before 0.2.0)."""
        return (self.driver or {}).get("run_id")

    # ------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        """run.json's data (`spec` under its stored name)."""
        data = _without_none(self)
        return {"spec" if k == "spec_data" else k: v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        """Raises ValueError where `data` is not a run's record (no spec, no plan)."""
        if not isinstance(data, dict) or not isinstance(data.get("spec"), dict):
            raise ValueError("it holds no spec")
        if not isinstance(data.get("plan"), dict):
            raise ValueError("it holds no plan")
        counts = {"units_computed": UnitCounts, "units_skipped": UnitCounts, "counts": RunCounts}
        known = {f.name for f in fields(cls)} - {"spec_data", "plan"}
        values = {k: (counts[k](**v) if k in counts and v is not None else v) for k, v in data.items() if k in known}
        return cls(spec_data=data["spec"], plan=PlanSummary.from_dict(data["plan"]), **values)

    # ------------------------------------------------------------ storage

    def save(self, store: Store) -> None:
        store.write_json(RUN_FILE, self.to_dict())

    @classmethod
    def load(cls, store: Store) -> RunRecord:
        """The run root's record, its spec parsed. Raises SpecError (one line) when the root holds no run
        or its run.json cannot be read."""
        try:
            data = store.read_json(RUN_FILE)
        except FileNotFoundError:
            raise SpecError(f"no run at {store.root} (run.json not found)") from None
        except ValueError as e:  # not JSON (json.JSONDecodeError, UnicodeDecodeError)
            raise SpecError(f"{store.uri(RUN_FILE)} is not a run's run.json: {e}") from None
        try:
            record = cls.from_dict(data)
        except (ValueError, TypeError, KeyError) as e:
            raise SpecError(f"{store.uri(RUN_FILE)} is not a run's run.json: {e}") from None
        record.spec  # parsed now: a stored spec this version cannot read fails here, in one line
        return record
