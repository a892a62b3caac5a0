"""The database side of a project's bulk consensus recompute, on arrays (annotations.consensus uses it).

At a million patches and 3M votes the record path spent its minutes on Python objects: a VoteRecord per vote
(built from a ``values_list`` with a label join), a second pass over them for gold, a Consensus instance with
its JSON posterior per stored row. Here each read is one binary ``COPY`` parsed into numpy arrays with a
structured dtype (no per-row Python object):

- :func:`counted_vote_arrays`: the project's active votes as consensus counts them, exactly as
  ``consensus.vote_records(project, weighted=True)`` does (crowd votes of students below the certification
  threshold left out, by the same ``uncounted_students``; suggestion-made votes weighted by
  ``consensus.vote_weight``'s rule, left out at 0);
- :func:`stored_rows`: the project's Consensus rows, the posterior read label by label in SQL;

and the writes build rows only for what is new or changed (:func:`insert_rows`, :func:`rewrite_rows`: one
COPY into a temporary table, one ``INSERT ... SELECT`` / ``UPDATE ... FROM``). The posterior is written with
``json.dumps`` of the same floats, so a row reads back as the record path wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from django.db import connection
from psycopg import sql

from .domain.consensus_arrays import STATUSES, ArrayResults, StoredRows, VoteArrays
from .models import AnnotationTask, Consensus, Project, Role, Vote
from .students import uncounted_students

# COPY's binary format: an 11-byte signature, a 4-byte flags word and a 4-byte header extension length; each
# row a 2-byte field count and, per field, a 4-byte length and the value; a 2-byte -1 trailer.
_COPY_HEADER = 19
_ROLE_CODES = {Role.CROWD.value: 0, Role.EXPERT.value: 1, Role.ADMIN.value: 2}


def _copy_arrays(query: sql.Composable, columns: Sequence[tuple[str, str]]) -> np.ndarray:
    """Run ``COPY (query) TO STDOUT (FORMAT binary)`` whose columns are all non-NULL and fixed-size, as one
    structured array with these (name, big-endian dtype) fields."""
    fields: list[tuple[str, str]] = [("n", ">i2")]
    for name, dtype in columns:
        fields += [(f"{name}_len", ">i4"), (name, dtype)]
    layout = np.dtype(fields)
    buffer = bytearray()
    with connection.cursor() as cursor:
        with cursor.cursor.copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query)) as copy:
            for block in copy:
                buffer += block
    body = memoryview(buffer)[_COPY_HEADER : len(buffer) - 2]
    if len(body) % layout.itemsize:
        raise ValueError("Unexpected COPY row layout (a NULL where none was expected).")
    rows = np.frombuffer(body, dtype=layout)
    if (rows["n"] != len(columns)).any() or any(
        (rows[f"{name}_len"] != np.dtype(dtype).itemsize).any() for name, dtype in columns
    ):
        raise ValueError("Unexpected COPY row layout (a NULL where none was expected).")
    return rows


def model_priors(project: Project, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The model's posterior per patch that has one, from each patch's latest crowd task that carries one
    (``AnnotationTask.model_posterior``, label name -> probability; a label it does not name is 0): ascending
    patch ids and a (patches, labels) float64 array in ``names`` order, read with one binary COPY."""
    columns = sql.SQL(", ").join(
        sql.SQL("COALESCE((t.model_posterior ->> {})::float8, 0)").format(sql.Literal(name)) for name in names
    )
    query = sql.SQL(
        "SELECT DISTINCT ON (t.patch_id) t.patch_id::int8, {columns} FROM {task} t "
        "WHERE t.project_id = {project} AND t.kind = 'crowd' AND t.model_posterior IS NOT NULL "
        "ORDER BY t.patch_id, t.id DESC"
    ).format(columns=columns, task=sql.Identifier(AnnotationTask._meta.db_table), project=sql.Literal(int(project.pk)))
    rows = _copy_arrays(query, [("patch", ">i8"), *((f"p{j}", ">f8") for j in range(len(names)))])
    proba = np.empty((len(rows), len(names)))
    for j in range(len(names)):
        proba[:, j] = rows[f"p{j}"]
    return rows["patch"].astype(np.int64), proba


def counted_vote_arrays(project: Project, label_ids: Sequence[int]) -> VoteArrays:
    """Every active vote of the project that counts in consensus, as arrays (see the module docstring).

    The label index is the position in ``label_ids`` (the project's label order); a vote whose label is not
    among them, or whose role is not crowd, expert or admin, is a ValueError, as ``validate_votes`` has it."""
    from .consensus import SUGGESTION_PROVENANCES

    roles = sorted(_ROLE_CODES, key=_ROLE_CODES.get)  # type: ignore[arg-type]
    query = sql.SQL(
        "SELECT v.patch_id::int8, v.annotator_id::int8, "
        "COALESCE(array_position({labels}::bigint[], v.label_id) - 1, -1)::int4, "
        "COALESCE(array_position({roles}::text[], v.role::text) - 1, -1)::int2, "
        "(v.provenance = ANY({suggested}::text[]))::int4::int2 "
        "FROM {vote} v WHERE v.project_id = {project} AND v.is_active"
    ).format(
        labels=sql.Literal([int(x) for x in label_ids]),
        roles=sql.Literal(roles),
        suggested=sql.Literal(sorted(SUGGESTION_PROVENANCES)),
        vote=sql.Identifier(Vote._meta.db_table),
        project=sql.Literal(int(project.pk)),
    )
    rows = _copy_arrays(
        query, [("patch", ">i8"), ("annotator", ">i8"), ("label", ">i4"), ("role", ">i2"), ("how", ">i2")]
    )
    patch, annotator = rows["patch"].astype(np.int64), rows["annotator"].astype(np.int64)
    label, role = rows["label"].astype(np.int64), rows["role"].astype(np.int8)
    if (label < 0).any():
        raise ValueError("A vote has a label that is not one of the project's labels; add the label class or fix it.")
    if (role < 0).any():
        raise ValueError(f"A vote has a role that is not one of {sorted(_ROLE_CODES)!r}.")
    # vote_weight: a suggestion-made vote counts with the project's weight, any other in full.
    weight = np.where(rows["how"] > 0, float(project.suggestion_weight), 1.0)
    keep = weight > 0
    uncounted = uncounted_students(project)
    if uncounted:
        keep &= ~((role == 0) & np.isin(annotator, np.fromiter(uncounted, dtype=np.int64, count=len(uncounted))))
    if not keep.all():
        patch, annotator, label, role, weight = patch[keep], annotator[keep], label[keep], role[keep], weight[keep]
    return VoteArrays(item=patch, annotator=annotator, label=label, expert=role > 0, weight=weight)


def stored_rows(project: Project, label_ids: Sequence[int], names: Sequence[str]) -> StoredRows:
    """The project's Consensus rows as arrays, patches ascending: what ``plan_changes`` compares.

    ``label`` is the label's index, -1 for none, -2 for a label not the project's; ``status`` the index in
    STATUSES (-1 for another); ``method`` whether it is the project's method; ``keys`` 0 when the posterior has
    exactly the project's label names, 1 when it is empty, 2 otherwise; ``posterior`` each label's stored
    probability (infinity where it is not a number, so it reads as changed)."""
    probabilities = sql.SQL(", ").join(
        sql.SQL("COALESCE(CASE WHEN jsonb_typeof(c.posterior -> {n}) = 'number' THEN (c.posterior ->> {n})::float8 "
                "END, 'Infinity')").format(n=sql.Literal(name))
        for name in names
    )  # fmt: skip
    query = sql.SQL(
        "SELECT c.patch_id::int8, c.id::int8, "
        "CASE WHEN c.label_id IS NULL THEN -1 ELSE COALESCE(array_position({labels}::bigint[], c.label_id) - 1, -2) "
        "END::int4, c.confidence::float8, c.agreement::float8, c.vote_count::int8, "
        "COALESCE(array_position({statuses}::text[], c.status::text) - 1, -1)::int2, "
        "(c.method = {method})::int4::int2, "
        "(CASE WHEN c.posterior IS NULL OR jsonb_typeof(c.posterior) <> 'object' OR c.posterior = '{{}}'::jsonb "
        "THEN 1 WHEN c.posterior ?& {names}::text[] AND (c.posterior - {names}::text[]) = '{{}}'::jsonb THEN 0 "
        "ELSE 2 END)::int2"
        "{comma}{probabilities} "
        "FROM {consensus} c WHERE c.project_id = {project} ORDER BY c.patch_id"
    ).format(
        labels=sql.Literal([int(x) for x in label_ids]),
        statuses=sql.Literal(list(STATUSES)),
        method=sql.Literal(str(project.consensus_method)),
        names=sql.Literal(list(names)),
        comma=sql.SQL(", " if names else ""),
        probabilities=probabilities,
        consensus=sql.Identifier(Consensus._meta.db_table),
        project=sql.Literal(int(project.pk)),
    )
    columns = [
        ("patch", ">i8"), ("id", ">i8"), ("label", ">i4"), ("confidence", ">f8"), ("agreement", ">f8"),
        ("vote_count", ">i8"), ("status", ">i2"), ("method", ">i2"), ("keys", ">i2"),
        *[(f"p{j}", ">f8") for j in range(len(names))],
    ]  # fmt: skip
    rows = _copy_arrays(query, columns)
    posterior = np.empty((len(rows), len(names)))
    for j in range(len(names)):
        posterior[:, j] = rows[f"p{j}"]
    return StoredRows(
        item=rows["patch"].astype(np.int64),
        id=rows["id"].astype(np.int64),
        label=rows["label"].astype(np.int64),
        confidence=rows["confidence"].astype(np.float64),
        agreement=rows["agreement"].astype(np.float64),
        vote_count=rows["vote_count"].astype(np.int64),
        status=rows["status"].astype(np.int8),
        method=rows["method"] > 0,
        keys=rows["keys"].astype(np.int8),
        posterior=posterior,
    )


def _copy_text(value: str) -> str:
    """A value as a field of COPY's text format (backslash, tab, newline and carriage return escaped)."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _lines(
    keys: Sequence[int],
    results: ArrayResults,
    rows: np.ndarray,
    label_ids: Sequence[int],
    names: Sequence[str],
) -> list[str]:
    """COPY text lines of (key, label_id, confidence, posterior, method, vote_count, agreement, status) for these
    result rows. The posterior is the text ``json.dumps`` gives the dict of its floats (``float.__repr__`` for each
    value, ``", "`` and ``": "`` between them), written out directly: building a dict and encoding it for each of a
    million new rows was most of a first recompute."""
    prefixes = [_copy_text(json.dumps(name)) + ": " for name in names]
    label_text = [*(str(pk) for pk in label_ids), "\\N"]  # label -1 (none): NULL
    method, lines = _copy_text(results.method), []
    columns = (
        results.label[rows].tolist(),
        results.confidence[rows].tolist(),
        results.posterior[rows].tolist(),
        results.vote_count[rows].tolist(),
        results.agreement[rows].tolist(),
        results.status[rows].tolist(),
    )
    for key, label, confidence, posterior, count, agreement, status in zip(keys, *columns, strict=True):
        text = "{" + ", ".join([p + repr(v) for p, v in zip(prefixes, posterior, strict=True)]) + "}"
        lines.append(
            f"{key}\t{label_text[label]}\t{confidence!r}\t{text}\t{method}\t{count}\t"
            f"{agreement!r}\t{STATUSES[status]}\n"
        )
    return lines


_FIELDS = ("label_id", "confidence", "posterior", "method", "vote_count", "agreement", "status")
_TEMPORARY = (
    "CREATE TEMPORARY TABLE {name} ({key} bigint PRIMARY KEY, label_id bigint, confidence double precision, "
    "posterior jsonb, method text, vote_count integer, agreement double precision, status text) ON COMMIT DROP"
)


def _copy_into_temporary(name: str, key: str, lines: Sequence[str]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {name}")  # an earlier call in the same transaction
        cursor.execute(_TEMPORARY.format(name=name, key=key))
        with cursor.cursor.copy(f"COPY {name} ({key}, {', '.join(_FIELDS)}) FROM STDIN") as copy:
            for start in range(0, len(lines), 10_000):
                copy.write("".join(lines[start : start + 10_000]))


def insert_rows(
    project: Project, results: ArrayResults, rows: np.ndarray, label_ids: Sequence[int], names: Sequence[str]
) -> None:
    """Create the Consensus rows of these result rows (patches without one). Call inside a transaction."""
    if not len(rows):
        return
    _copy_into_temporary(
        "consensus_new", "patch_id", _lines(results.item[rows].tolist(), results, rows, label_ids, names)
    )
    fields = ", ".join(_FIELDS)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {Consensus._meta.db_table} (patch_id, project_id, {fields}, updated_at) "
            f"SELECT patch_id, %s, {fields}, now() FROM consensus_new ORDER BY patch_id",
            [project.pk],
        )
        cursor.execute("DROP TABLE consensus_new")


def rewrite_rows(
    ids: Sequence[int],
    results: ArrayResults,
    rows: np.ndarray,
    label_ids: Sequence[int],
    names: Sequence[str],
    pending: Sequence[int] = (),
    method: str = "",
) -> None:
    """Write the consensus fields (and ``updated_at``) of the rows ``ids`` from these result rows, and reset the
    rows ``pending`` to pending (no label, empty posterior, ``method``), with one COPY into a temporary table
    and one ``UPDATE ... FROM`` it (Django's ``bulk_update`` builds a CASE per field per row). Call inside a
    transaction."""
    if not (len(ids) or len(pending)):
        return
    reset = f"\\N\t0.0\t{{}}\t{_copy_text(method)}\t0\t0.0\t{STATUSES[0]}\n"
    lines = _lines(ids, results, rows, label_ids, names) + [f"{pk}\t{reset}" for pk in pending]
    _copy_into_temporary("consensus_rewrite", "id", lines)
    assignments = ", ".join(f"{c} = n.{c}" for c in _FIELDS)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Consensus._meta.db_table} AS c SET {assignments}, updated_at = now() "
            "FROM consensus_rewrite AS n WHERE c.id = n.id"
        )
        cursor.execute("DROP TABLE consensus_rewrite")
