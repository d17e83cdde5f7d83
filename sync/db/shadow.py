"""The ``shadow`` table: per record, the values both sides agreed on at the last push or pull (the base of every
diff), as a canonical record in JSON, with the ``modifiedOn`` it was taken at."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, JSONB

_IDS = bindparam("ids", type_=ARRAY(BIGINT))


def load_shadows(conn: Connection, entity: str, mirror_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    ids = list(mirror_ids)
    if not ids:
        return {}
    rows = conn.execute(
        text("SELECT mirror_id, data FROM shadow WHERE entity = :e AND mirror_id = ANY(:ids)").bindparams(_IDS),
        {"e": entity, "ids": ids},
    )
    return {mid: dict(data) for mid, data in rows}


def write_shadow(conn: Connection, entity: str, mirror_id: int, st_id: int, record: Mapping[str, Any]) -> None:
    """shadow := record (the values both sides now agree on)."""
    conn.execute(
        text("""INSERT INTO shadow (entity, mirror_id, st_id, data, modified_on, updated_at)
                VALUES (:e, :m, :s, :d, CAST(:mod AS timestamptz), now())
                ON CONFLICT (entity, mirror_id) DO UPDATE
                SET st_id = EXCLUDED.st_id, data = EXCLUDED.data, modified_on = EXCLUDED.modified_on,
                    updated_at = now()""").bindparams(bindparam("d", type_=JSONB)),
        {"e": entity, "m": mirror_id, "s": st_id, "d": dict(record), "mod": record.get("modified_on")},
    )


def write_shadows(conn: Connection, entity: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Many shadows in one statement: ``{"mirror_id", "st_id", "data", "modified_on"}`` each."""
    if rows:
        conn.execute(
            text("""INSERT INTO shadow (entity, mirror_id, st_id, data, modified_on, updated_at)
                    SELECT :e, r.mirror_id, r.st_id, r.data, r.modified_on, now()
                    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
                         AS r(mirror_id bigint, st_id bigint, data jsonb, modified_on timestamptz)
                    ON CONFLICT (entity, mirror_id) DO UPDATE
                    SET st_id = EXCLUDED.st_id, data = EXCLUDED.data, modified_on = EXCLUDED.modified_on,
                        updated_at = now()"""),
            {"e": entity, "rows": json.dumps(list(rows))},
        )


def newest_modified_on(conn: Connection, entity: str) -> Any:
    """The newest ServiceTitan ``modifiedOn`` any shadow of ``entity`` holds (None: no shadow yet)."""
    return conn.execute(text("SELECT max(modified_on) FROM shadow WHERE entity = :e"), {"e": entity}).scalar_one()
