"""The database edge for records: mirror rows and shadows in and out as canonical records (sync.fields).

Shared by detect, dispatch and pull. Callers own the transaction; writes that must not be logged as local
changes need ``sync.db.bypass_triggers(conn)`` first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, JSONB

from sync.core.fields import BY_COLUMN, FIELDS, TABLES, Entity, canonical

_JSON_KINDS = ("custom_fields", "external_data")


def _db_columns(entity: Entity) -> list[str]:
    return [("customer_id" if f.column == "customer_st_id" else f.column) for f in FIELDS[entity]]


def _select_sql(entity: Entity) -> str:
    cols = []
    for f in FIELDS[entity]:
        if f.column == "customer_st_id":
            cols.append("(SELECT c.st_id FROM customers c WHERE c.id = m.customer_id) AS customer_st_id")
        else:
            cols.append(f"m.{f.column}")
    return f"SELECT m.id, m.st_id, {', '.join(cols)} FROM {TABLES[entity]} m"


@dataclass(frozen=True)
class MirrorRow:
    mirror_id: int
    st_id: int | None
    record: dict[str, Any]
    """Canonical values (sync.fields); for locations ``customer_st_id`` is None if the customer is local-only."""
    customer_id: int | None = None
    """Locations: the mirror's customer_id as stored."""


def _row_to_record(entity: Entity, row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in FIELDS[entity]:
        value = row[f.column]
        try:
            out[f.column] = canonical(f.kind, value)
        except (TypeError, ValueError):
            out[f.column] = value  # keep the bad value: request validation reports it on the column
    return out


def load_mirror(conn: Connection, entity: Entity, mirror_ids: Iterable[int], *,
                for_update: bool = False) -> dict[int, MirrorRow]:
    ids = list(mirror_ids)
    if not ids:
        return {}
    sql = _select_sql(entity)
    if entity == "location":
        sql = sql.replace("SELECT m.id,", "SELECT m.id, m.customer_id AS mirror_customer_id,", 1)
    sql += " WHERE m.id = ANY(:ids)" + (" FOR UPDATE OF m" if for_update else "")
    rows = conn.execute(text(sql).bindparams(bindparam("ids", type_=ARRAY(BIGINT))), {"ids": ids}).mappings()
    return {
        r["id"]: MirrorRow(r["id"], r["st_id"], _row_to_record(entity, r),
                           r["mirror_customer_id"] if entity == "location" else None)
        for r in rows
    }


def load_shadows(conn: Connection, entity: Entity, mirror_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    ids = list(mirror_ids)
    if not ids:
        return {}
    rows = conn.execute(
        text("SELECT mirror_id, data FROM shadow WHERE entity = :e AND mirror_id = ANY(:ids)")
        .bindparams(bindparam("ids", type_=ARRAY(BIGINT))),
        {"e": entity, "ids": ids},
    )
    return {mid: dict(data) for mid, data in rows}


def write_shadow(conn: Connection, entity: Entity, mirror_id: int, st_id: int, record: Mapping[str, Any]) -> None:
    """shadow := record (the values both sides now agree on)."""
    conn.execute(
        text("""INSERT INTO shadow (entity, mirror_id, st_id, data, modified_on, updated_at)
                VALUES (:e, :m, :s, :d, CAST(:mod AS timestamptz), now())
                ON CONFLICT (entity, mirror_id) DO UPDATE
                SET st_id = EXCLUDED.st_id, data = EXCLUDED.data, modified_on = EXCLUDED.modified_on,
                    updated_at = now()""").bindparams(bindparam("d", type_=JSONB)),
        {"e": entity, "m": mirror_id, "s": st_id, "d": dict(record), "mod": record.get("modified_on")},
    )


def customer_mirror_ids(conn: Connection, st_ids: Iterable[int]) -> dict[int, int]:
    """ServiceTitan customer id -> mirror customers.id, for those in the mirror."""
    ids = list({i for i in st_ids if i is not None})
    if not ids:
        return {}
    rows = conn.execute(text("SELECT st_id, id FROM customers WHERE st_id = ANY(:ids)")
                        .bindparams(bindparam("ids", type_=ARRAY(BIGINT))), {"ids": ids})
    return {s: m for s, m in rows}


def mirror_ids_by_st_id(conn: Connection, entity: Entity, st_ids: Iterable[int]) -> dict[int, int]:
    ids = list(set(st_ids))
    if not ids:
        return {}
    rows = conn.execute(text(f"SELECT st_id, id FROM {TABLES[entity]} WHERE st_id = ANY(:ids)")
                        .bindparams(bindparam("ids", type_=ARRAY(BIGINT))), {"ids": ids})
    return {s: m for s, m in rows}


def _db_value(entity: Entity, column: str, value: Any) -> tuple[str, Any, Any]:
    """(db column, value, bind type) for a canonical value."""
    f = BY_COLUMN[entity][column]
    if f.kind in _JSON_KINDS:
        return column, json.dumps(value or {}), "jsonb"
    if f.kind == "id_list":
        return column, list(value or []), "bigint[]"
    if f.kind == "timestamp":
        return column, value, "timestamptz"
    return column, value, None


def update_mirror(conn: Connection, entity: Entity, mirror_id: int, values: Mapping[str, Any], *,
                  customer_mirror_id: int | None = None, extra_sql: str = "") -> None:
    """Set mirror columns from canonical values. ``customer_st_id`` needs ``customer_mirror_id`` resolved.

    ``extra_sql`` adds raw assignments (e.g. ``sync_status = 'synced'``) to the same UPDATE.
    """
    sets: list[str] = []
    params: dict[str, Any] = {"mid": mirror_id}
    for i, (column, value) in enumerate(values.items()):
        if column == "customer_st_id":
            sets.append(f"customer_id = :p{i}")
            params[f"p{i}"] = customer_mirror_id
            continue
        col, v, cast = _db_value(entity, column, value)
        sets.append(f"{col} = CAST(:p{i} AS {cast})" if cast else f"{col} = :p{i}")
        params[f"p{i}"] = v
    if extra_sql:
        sets.append(extra_sql)
    if not sets:
        return
    conn.execute(text(f"UPDATE {TABLES[entity]} SET {', '.join(sets)} WHERE id = :mid"), params)


def insert_mirror(conn: Connection, entity: Entity, st_id: int, record: Mapping[str, Any], *,
                  customer_mirror_id: int | None = None) -> int:
    """Insert a record pulled from ServiceTitan; returns the new mirror id."""
    cols = ["st_id", "sync_status", "synced_at"]
    vals = [":st_id", "'synced'", "now()"]
    params: dict[str, Any] = {"st_id": st_id}
    for i, (column, value) in enumerate(record.items()):
        if column == "customer_st_id":
            cols.append("customer_id")
            vals.append(f":p{i}")
            params[f"p{i}"] = customer_mirror_id
            continue
        if column not in BY_COLUMN[entity]:
            continue
        col, v, cast = _db_value(entity, column, value)
        if v is None and BY_COLUMN[entity][column].kind == "bool":
            continue  # NOT NULL DEFAULT
        cols.append(col)
        vals.append(f"CAST(:p{i} AS {cast})" if cast else f":p{i}")
        params[f"p{i}"] = v
    sql = f"INSERT INTO {TABLES[entity]} ({', '.join(cols)}) VALUES ({', '.join(vals)}) RETURNING id"
    return int(conn.execute(text(sql), params).scalar_one())


def log_recheck(conn: Connection, entity: Entity, mirror_ids: Iterable[int]) -> None:
    """Ask detect to re-diff these records (used where stsync's own writes leave mirror != shadow)."""
    ids = list(mirror_ids)
    if ids:
        conn.execute(
            text("INSERT INTO change_log (entity, mirror_id, op) SELECT :e, unnest(CAST(:ids AS bigint[])), 'R'"),
            {"e": entity, "ids": ids},
        )
        # stsync's own writes bypass the NOTIFY trigger: wake detect explicitly (delivered at commit)
        conn.execute(text("SELECT pg_notify(current_schema() || '_changes', 'recheck')"))
