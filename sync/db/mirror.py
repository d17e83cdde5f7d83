"""The mirror tables (``customers``, ``locations``): rows in and out as canonical records (sync.core.fields).

The one writer of the mirror tables by stsync, and so the one owner of ``sync_status`` (every value, who sets it
and when: docs/schema.md). Callers own the transaction; writes that must not be logged as local changes need
``sync.db.engine.bypass_triggers(conn)`` first. A location's customer is ``customer_st_id`` (ServiceTitan's id) in
a record and ``customer_id`` (the mirror's id) in the table: translated here, on the way in and out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT

from sync.core.fields import BY_COLUMN, CUSTOMER_LINK, FIELDS, NAMES, NOT_NULL_BOOLS, Entity, Kind, canonical, db_column

_IDS = bindparam("ids", type_=ARRAY(BIGINT))
_JSON_KINDS = ("custom_fields", "external_data")
_SQL_TYPES: dict[Kind, str] = {
    "text": "text", "float": "double precision", "bool": "boolean", "int": "bigint", "timestamp": "timestamptz",
    "id_list": "bigint[]", "custom_fields": "jsonb", "external_data": "jsonb",
}

SyncStatus = Literal["synced", "pending", "error", "local_only", "discarded", "waiting_for_location"]
"""Every value of ``sync_status`` (docs/schema.md has the state table)."""


def _select_sql(entity: Entity) -> str:
    cols = []
    for f in FIELDS[entity]:
        if f.column == CUSTOMER_LINK:
            cols.append(f"(SELECT c.st_id FROM customers c WHERE c.id = m.customer_id) AS {CUSTOMER_LINK}")
        else:
            cols.append(f"m.{f.column}")
    return f"SELECT m.id, m.st_id, {', '.join(cols)} FROM {NAMES[entity].table} m"


@dataclass(frozen=True)
class MirrorRow:
    mirror_id: int
    st_id: int | None
    record: dict[str, Any]
    """Canonical values (sync.core.fields); for locations ``customer_st_id`` is None if the customer is local-only."""
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


# ------------------------------------------------------------------------------------------------ reads


def load_mirror(conn: Connection, entity: Entity, mirror_ids: Iterable[int], *,
                for_update: bool = False) -> dict[int, MirrorRow]:
    ids = list(mirror_ids)
    if not ids:
        return {}
    sql = _select_sql(entity)
    if entity == "location":
        sql = sql.replace("SELECT m.id,", "SELECT m.id, m.customer_id AS mirror_customer_id,", 1)
    sql += " WHERE m.id = ANY(:ids)" + (" FOR UPDATE OF m" if for_update else "")
    rows = conn.execute(text(sql).bindparams(_IDS), {"ids": ids}).mappings()
    return {
        r["id"]: MirrorRow(r["id"], r["st_id"], _row_to_record(entity, r),
                           r["mirror_customer_id"] if entity == "location" else None)
        for r in rows
    }


def lock(conn: Connection, entity: Entity, mirror_ids: Iterable[int]) -> None:
    """Lock these rows in id order (two pulls never deadlock; no local write slips between read and write)."""
    conn.execute(text(f"SELECT id FROM {NAMES[entity].table} WHERE id = ANY(:ids) ORDER BY id FOR UPDATE")
                 .bindparams(_IDS), {"ids": sorted(mirror_ids)})


def customer_mirror_ids(conn: Connection, st_ids: Iterable[int]) -> dict[int, int]:
    """ServiceTitan customer id -> mirror customers.id, for those in the mirror."""
    return mirror_ids_by_st_id(conn, "customer", (i for i in st_ids if i is not None))


def mirror_ids_by_st_id(conn: Connection, entity: Entity, st_ids: Iterable[int]) -> dict[int, int]:
    ids = list(set(st_ids))
    if not ids:
        return {}
    rows = conn.execute(text(f"SELECT st_id, id FROM {NAMES[entity].table} WHERE st_id = ANY(:ids)")
                        .bindparams(_IDS), {"ids": ids})
    return {s: m for s, m in rows}


def new_locations_of(conn: Connection, customer_ids: Iterable[int]) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    """Customer mirror id -> its location rows without ``st_id`` ((mirror id, record) each, in id order): what a
    ``POST /customers`` of that customer carries."""
    ids = list(customer_ids)
    if not ids:
        return {}
    rows = conn.execute(text(_select_sql("location").replace("SELECT m.id,", "SELECT m.id, m.customer_id AS cid,", 1)
                             + " WHERE m.customer_id = ANY(:ids) AND m.st_id IS NULL ORDER BY m.id")
                        .bindparams(_IDS), {"ids": ids}).mappings()
    out: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for r in rows:
        out.setdefault(r["cid"], []).append((r["id"], _row_to_record("location", r)))
    return out


def new_customers_of(conn: Connection, location_ids: Iterable[int]) -> set[int]:
    """The customers (mirror ids) without ``st_id`` of these location rows without ``st_id``: each such location
    goes out inside its customer's ``POST /customers``."""
    ids = list(location_ids)
    if not ids:
        return set()
    return {c for (c,) in conn.execute(
        text("""SELECT DISTINCT c.id FROM locations l JOIN customers c ON c.id = l.customer_id
                WHERE l.id = ANY(:ids) AND l.st_id IS NULL AND c.st_id IS NULL""").bindparams(_IDS), {"ids": ids})}


def has_unlinked(conn: Connection, entity: Entity) -> bool:
    """Some row of ``entity`` has no ``st_id`` (inserted locally: it may be created in ServiceTitan)."""
    return bool(conn.execute(text(f"SELECT EXISTS (SELECT 1 FROM {NAMES[entity].table} WHERE st_id IS NULL)"))
                .scalar_one())


def link(conn: Connection, entity: Entity, mirror_id: int, st_id: int) -> bool:
    """A row created in ServiceTitan gets its ``st_id`` (only where it has none); False if it already had one."""
    return conn.execute(text(f"UPDATE {NAMES[entity].table} SET st_id = :s WHERE id = :m AND st_id IS NULL "
                             "RETURNING 1"), {"m": mirror_id, "s": st_id}).first() is not None


def restore(conn: Connection, entity: Entity, old_row: Mapping[str, Any]) -> bool:
    """Put a deleted row back as it was (``old_row``: the row as the delete trigger saw it, same id); False if a
    row with that id or ``st_id`` exists again. The caller bypasses the change-log triggers."""
    table = NAMES[entity].table
    return conn.execute(text(f"""INSERT INTO {table}
                                 SELECT * FROM jsonb_populate_record(NULL::{table}, CAST(:r AS jsonb))
                                 ON CONFLICT DO NOTHING RETURNING 1"""), {"r": json.dumps(old_row)}).first() is not None


def count_to_create(conn: Connection, entity: Entity) -> int:
    """Rows without ``st_id`` (inserted locally: created in ServiceTitan, or waiting, or dead with a reason)."""
    return int(conn.execute(text(f"SELECT count(*) FROM {NAMES[entity].table} WHERE st_id IS NULL")).scalar_one())


def count_with_error(conn: Connection, entity: Entity) -> int:
    return int(conn.execute(
        text(f"SELECT count(*) FROM {NAMES[entity].table} WHERE sync_error IS NOT NULL")).scalar_one())


# ------------------------------------------------------------------------------------------------ values


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


_STATUS_SQL: dict[str, str] = {
    "synced": "sync_status = 'synced', sync_error = NULL, synced_at = now()",
    "pending": "sync_status = 'pending'",
    "resend": "sync_status = 'pending', sync_error = NULL, synced_at = now()",
}


def update_mirror(conn: Connection, entity: Entity, mirror_id: int, values: Mapping[str, Any], *,
                  customer_mirror_id: int | None = None,
                  status: Literal["synced", "pending", "resend"] | None = None) -> None:
    """Set mirror columns from canonical values. ``customer_st_id`` needs ``customer_mirror_id`` resolved.

    ``status``: set ``sync_status`` in the same UPDATE (``synced`` also clears ``sync_error`` and stamps
    ``synced_at``; ``resend``: a 2xx applied, but the row differs from its new base and is pending again).
    """
    sets: list[str] = []
    params: dict[str, Any] = {"mid": mirror_id}
    for i, (column, value) in enumerate(values.items()):
        if column == CUSTOMER_LINK:
            sets.append(f"{db_column(column)} = :p{i}")
            params[f"p{i}"] = customer_mirror_id
            continue
        col, v, cast = _db_value(entity, column, value)
        sets.append(f"{col} = CAST(:p{i} AS {cast})" if cast else f"{col} = :p{i}")
        params[f"p{i}"] = v
    if status is not None:
        sets.append(_STATUS_SQL[status])
    if not sets:
        return
    conn.execute(text(f"UPDATE {NAMES[entity].table} SET {', '.join(sets)} WHERE id = :mid"), params)


# ------------------------------------------------------------------------------------------------ the pull


def _recordset(entity: Entity, columns: Sequence[str], extra: str) -> str:
    """``r(col type, ...)`` for jsonb_to_recordset; ``customer_st_id`` carries the customer's mirror id."""
    defs = [f"{c} bigint" if c == CUSTOMER_LINK else f"{c} {_SQL_TYPES[BY_COLUMN[entity][c].kind]}"
            for c in columns]
    return "r(" + ", ".join([*defs, extra]) + ")"


def insert_pulled(conn: Connection, entity: Entity,
                  inserts: Sequence[tuple[int, Mapping[str, Any], int | None]]) -> int:
    """New records from ServiceTitan: ``(st_id, canonical record, customer mirror id)`` each. One statement
    writes the mirror rows (``synced``) and their shadows (the record itself). Returns the rows inserted."""
    if not inserts:
        return 0
    table = NAMES[entity].table
    # a shadow left behind by a mirror row deleted earlier would collide with the new row's
    conn.execute(text("DELETE FROM shadow WHERE entity = :e AND st_id = ANY(:ids)").bindparams(_IDS),
                 {"e": entity, "ids": [s for s, _, _ in inserts]})
    # one statement: the mirror rows, then their shadows (the same JSON element minus our two keys)
    columns = tuple(f.column for f in FIELDS[entity])
    rows = []
    for st_id, rec, customer_mid in inserts:
        row = dict(rec)
        row["stsync_st_id"] = st_id
        if entity == "location":
            row["stsync_customer_id"] = customer_mid
        rows.append(row)
    values = []
    for c in columns:
        if c == CUSTOMER_LINK:
            values.append("r.stsync_customer_id")
        elif c in NOT_NULL_BOOLS:
            values.append(f"coalesce(r.{c}, {str(NOT_NULL_BOOLS[c]).lower()})")
        else:
            values.append(f"r.{c}")
    return int(conn.execute(
        text(f"""WITH src AS (SELECT e FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS e),
                 ins AS (
                     INSERT INTO {table} (st_id, sync_status, synced_at, {', '.join(map(db_column, columns))})
                     SELECT r.stsync_st_id, 'synced', now(), {', '.join(values)}
                     FROM src CROSS JOIN LATERAL jsonb_to_record(src.e)
                          AS {_recordset(entity, columns, 'stsync_st_id bigint, stsync_customer_id bigint')}
                     RETURNING id, st_id)
                 INSERT INTO shadow (entity, mirror_id, st_id, data, modified_on, updated_at)
                 SELECT :e, ins.id, ins.st_id, src.e - 'stsync_st_id' - 'stsync_customer_id',
                        CAST(src.e ->> 'modified_on' AS timestamptz), now()
                 FROM ins JOIN src ON CAST(src.e ->> 'stsync_st_id' AS bigint) = ins.st_id"""),
        {"rows": json.dumps(rows), "e": entity},
    ).rowcount)


def update_pulled(conn: Connection, entity: Entity, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """The same set of columns for many records (one statement). Each row holds those canonical values (a
    location's ``customer_st_id`` as the customer's *mirror* id), ``stsync_id`` (the mirror id) and
    ``stsync_synced`` (True: nothing left to push, the row becomes ``synced``; False: its status is kept)."""
    sets = [f"{db_column(c)} = r.{c}" for c in columns]
    sets += ["sync_status = CASE WHEN r.stsync_synced THEN 'synced' ELSE m.sync_status END",
             "synced_at = CASE WHEN r.stsync_synced THEN now() ELSE m.synced_at END"]
    conn.execute(
        text(f"""UPDATE {NAMES[entity].table} AS m SET {', '.join(sets)}
                 FROM jsonb_to_recordset(CAST(:rows AS jsonb))
                      AS {_recordset(entity, columns, 'stsync_id bigint, stsync_synced boolean')}
                 WHERE m.id = r.stsync_id"""),
        {"rows": json.dumps(list(rows))},
    )


# ------------------------------------------------------------------------------------------------ sync_status


def mark_synced_if_pending(conn: Connection, entity: Entity, mirror_ids: Sequence[int]) -> None:
    """Detect found nothing to send for these records."""
    conn.execute(text(f"UPDATE {NAMES[entity].table} SET sync_status = 'synced' "
                      "WHERE id = ANY(:ids) AND sync_status = 'pending'").bindparams(_IDS),
                 {"ids": list(mirror_ids)})


def mark_pending(conn: Connection, entity: Entity, mirror_ids: Sequence[int]) -> None:
    """A request for these records is queued (detect), or local values are still to be pushed (dispatch)."""
    conn.execute(text(f"UPDATE {NAMES[entity].table} SET sync_status = 'pending' "
                      "WHERE id = ANY(:ids) AND sync_status <> 'pending'").bindparams(_IDS),
                 {"ids": list(mirror_ids)})


def mark_local_only(conn: Connection, entity: Entity, mirror_ids: Sequence[int], error: str) -> int:
    """Rows without a ServiceTitan record (no st_id or never pulled); returns how many newly became so."""
    return int(conn.execute(
        text(f"""UPDATE {NAMES[entity].table} SET sync_status = 'local_only', sync_error = CAST(:err AS jsonb)
                 WHERE id = ANY(:ids) AND sync_status IS DISTINCT FROM 'local_only'""").bindparams(_IDS),
        {"ids": list(mirror_ids), "err": error}).rowcount)


def mark_waiting(conn: Connection, mirror_ids: Sequence[int], error: str) -> int:
    """New customers with no location yet (``waiting_for_location``: ServiceTitan creates no customer without
    one); returns how many newly became so."""
    return int(conn.execute(
        text("""UPDATE customers SET sync_status = 'waiting_for_location', sync_error = CAST(:err AS jsonb)
                WHERE id = ANY(:ids) AND sync_status IS DISTINCT FROM 'waiting_for_location'""").bindparams(_IDS),
        {"ids": list(mirror_ids), "err": error}).rowcount)


def count_by_status(conn: Connection, entity: Entity, status: str) -> int:
    return int(conn.execute(text(f"SELECT count(*) FROM {NAMES[entity].table} WHERE sync_status = :s"),
                            {"s": status}).scalar_one())


def mark_error(conn: Connection, entity: Entity, mirror_id: int, error: str) -> None:
    """The record's change ended dead (rejected before sending, or by ServiceTitan): ``error`` is JSON text."""
    conn.execute(text(f"UPDATE {NAMES[entity].table} SET sync_status = 'error', sync_error = CAST(:err AS jsonb) "
                      "WHERE id = :m"), {"m": mirror_id, "err": error})


def mark_retried(conn: Connection, entity: Entity, mirror_id: int) -> None:
    """An operator sends the record's dead change again."""
    conn.execute(text(f"UPDATE {NAMES[entity].table} SET sync_status = 'pending', sync_error = NULL WHERE id = :m"),
                 {"m": mirror_id})


def mark_discarded(conn: Connection, entity: Entity, mirror_id: int, error: str) -> None:
    """An operator closed the record's change without sending it."""
    conn.execute(text(f"UPDATE {NAMES[entity].table} SET sync_status = 'discarded', sync_error = CAST(:e AS jsonb) "
                      "WHERE id = :m"), {"m": mirror_id, "e": error})


# ------------------------------------------------------------------------------------------------ read-only edits


def flag_read_only(conn: Connection, entity: Entity, mirror_id: int, error: str) -> None:
    """Local edits of read-only columns: ``sync_error`` names them (``read_only_columns``); the status is kept."""
    conn.execute(text(f"UPDATE {NAMES[entity].table} SET sync_error = CAST(:err AS jsonb) WHERE id = :m"),
                 {"m": mirror_id, "err": error})


def read_only_flagged(conn: Connection, entity: Entity) -> dict[int, list[str]]:
    """Rows flagged by ``flag_read_only``: mirror id -> the read-only columns edited locally."""
    rows = conn.execute(text(f"SELECT id, sync_error -> 'read_only_columns' FROM {NAMES[entity].table} "
                             "WHERE sync_error ? 'read_only_columns'"))
    return {mid: [str(c) for c in cols or []] for mid, cols in rows}


def clear_read_only_flag(conn: Connection, entity: Entity, mirror_id: int) -> None:
    conn.execute(text(f"UPDATE {NAMES[entity].table} SET sync_error = NULL "
                      "WHERE id = :m AND sync_error ? 'read_only_columns'"), {"m": mirror_id})


def count_read_only_flagged(conn: Connection, entity: Entity) -> int:
    return int(conn.execute(text(f"SELECT count(*) FROM {NAMES[entity].table} "
                                 "WHERE sync_error ? 'read_only_columns'")).scalar_one())
