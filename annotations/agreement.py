"""The agreement report of a project: how far annotators agree, and how reliable each one is.

The report reads every active vote and fits Dawid-Skene: about 3.4 s at 29,000 votes on 2 cores
(``tests/bench/bench_pages.py``), minutes at millions. So the dashboard reads it through
:func:`cached_report`: a project whose last report took at most ``INLINE_SECONDS`` gets a fresh one on every
request, as before; a larger one gets the last report (shared by every server process through the cache,
with when it was computed) and, once that is older than ``REPORT_MAX_AGE_S``, one refresh on the ``cpu``
worker, never in the request.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db import connection

from .consensus import gold_labels, label_names, vote_records
from .domain.agreement import annotator_reliability, pair_agreement, project_agreement
from .models import Consensus, Project, Role, Vote

logger = logging.getLogger(__name__)

INLINE_SECONDS = 1.0  # a report that took at most this long is computed again on every request
INLINE_VOTES = 5_000  # with no report yet: computed in the request up to this many active votes (about 0.6 s)
REPORT_MAX_AGE_S = 60  # a slower report is served up to this old before the worker computes the next one
REPORT_KEEP_S = 7 * 24 * 3600  # how long the cache keeps the last report (it is served, marked, when older)
REFRESH_LIMIT_S = 1800  # the worker's time limit; a refresh lost with a dead worker is asked again after it


def _keys(project: Project) -> tuple[str, str]:
    # created_at in the key: a project id reused (a fresh database) never reads another's report.
    tag = f"{project.pk}:{project.created_at.timestamp():.6f}"
    return f"histoloop:agreement:{tag}", f"histoloop:agreement:refreshing:{tag}"


def store_report(project: Project) -> dict[str, Any]:
    """Compute the report now and keep it, with when and how long it took, for :func:`cached_report`."""
    started = time.perf_counter()
    report = agreement_report(project)
    entry = {
        "report": report,
        "computed_at": datetime.now(UTC).isoformat(),
        "at": time.time(),
        "seconds": time.perf_counter() - started,
    }
    cache.set(_keys(project)[0], entry, REPORT_KEEP_S)
    return entry


def refresh_report(project: Project) -> None:
    """The worker's side: compute and keep the report, then let the next refresh be asked for."""
    _, refreshing = _keys(project)
    try:
        store_report(project)
    finally:
        cache.delete(refreshing)


class ReportUnavailable(Exception):
    """A large project has no report yet and the worker's queue cannot take the job of computing one."""


def _ask_worker(project: Project) -> bool:
    """Queue one refresh (one at a time per project: a cache ``add``). True when a refresh is queued or already
    on its way, False when the broker could not take it (the next request asks again)."""
    from .tasks import refresh_agreement_task

    _, refreshing = _keys(project)
    if not cache.add(refreshing, datetime.now(UTC).isoformat(), REFRESH_LIMIT_S):
        return True
    try:
        refresh_agreement_task.delay(project.pk)
    except Exception:
        logger.warning("Could not queue the agreement report of project %s", project.pk, exc_info=True)
        cache.delete(refreshing)
        return False
    return True


def cached_report(project: Project) -> dict[str, Any] | None:
    """The report as the dashboard reads it, with ``computed_at`` (ISO time) and ``refreshing`` (a newer one
    is being computed on the worker); None while the first report of a large project is being computed.
    Raises :class:`ReportUnavailable` when that first report cannot even be queued."""
    from . import stats

    key, refreshing = _keys(project)
    entry = cache.get(key)
    if entry is None:
        if stats.label_counts(project)["votes"] > INLINE_VOTES:
            if not _ask_worker(project):
                raise ReportUnavailable(
                    "The worker's queue cannot be reached, so this project's agreement report cannot be computed "
                    "now. Try again in a few minutes."
                )
            return None
        entry = store_report(project)
    elif entry["seconds"] <= INLINE_SECONDS:
        entry = store_report(project)
    elif time.time() - entry["at"] > REPORT_MAX_AGE_S:
        _ask_worker(project)  # if the broker is down, the last report is served as it is, marked by its time
    return {
        **entry["report"],
        "computed_at": entry["computed_at"],
        "compute_seconds": round(entry["seconds"], 3),
        "refreshing": cache.get(refreshing) is not None,
    }


def agreement_report(project: Project) -> dict[str, Any]:
    """Fleiss' kappa / Krippendorff's alpha (statsmodels, krippendorff) and per-annotator reliability
    (scikit-learn Cohen's kappa, crowd-kit Dawid-Skene confusion)."""
    records = vote_records(project)
    labels = label_names(project)
    if not records:
        return {"overall": None, "per_class": {}, "annotators": [], "labels": labels, "provenance": []}
    agreement = project_agreement(records, labels, roles={Role.CROWD})
    reliability = annotator_reliability(records, labels, gold=gold_labels(project, records))
    users = dict(get_user_model().objects.filter(pk__in=list(reliability)).values_list("pk", "username"))
    roles = dict(Vote.objects.filter(project=project, is_active=True).values_list("annotator_id", "role"))
    return {
        "labels": labels,
        "overall": asdict(agreement.overall),
        "fleiss_kappa": agreement.overall.fleiss_kappa,
        "krippendorff_alpha": agreement.overall.krippendorff_alpha,
        "per_class": {name: asdict(score) for name, score in agreement.per_class.items()},
        "annotators": [
            {
                "username": users.get(int(a), str(a)),
                "role": roles.get(int(a)),
                "n_votes": r.n_votes,
                "cohen_kappa_vs_experts": r.kappa_vs_experts,
                "n_expert_overlap": r.n_expert_overlap,
                "gold_accuracy": r.gold_accuracy,
                "n_gold": r.n_gold,
                "ds_confusion": r.ds_confusion,
            }
            for a, r in sorted(reliability.items(), key=lambda kv: users.get(int(kv[0]), ""))
        ],
        "provenance": provenance_agreement(project),
    }


_VOTE = Vote._meta.db_table
# Each active vote of a mode against the active votes of the others on the same patch that the reference
# admits: (mode, its label, the reference's label) -> pairs. Aggregated in PostgreSQL, along the
# (patch, annotator) index: a project has millions of votes.
_PAIRS_SQL = f"""
SELECT v.provenance, v.label_id, r.label_id, COUNT(*) FROM {_VOTE} v
JOIN {_VOTE} r ON r.patch_id = v.patch_id AND r.annotator_id <> v.annotator_id AND r.is_active
WHERE v.project_id = %(project)s AND v.is_active AND {{reference}}
GROUP BY 1, 2, 3
"""
_REFERENCES = {
    # The experts' and admins' votes on the patch (never the voter's own).
    "experts": "r.role = ANY(%(expert_roles)s)",
    # Votes made blind to the model: labelled one at a time, no suggestion shown.
    "independent": "r.provenance = 'manual' AND r.model_version_shown_id IS NULL",
}
_CONSENSUS_SQL = f"""
SELECT v.provenance, v.label_id, c.label_id, COUNT(*) FROM {_VOTE} v
JOIN {Consensus._meta.db_table} c ON c.patch_id = v.patch_id
WHERE v.project_id = %(project)s AND v.is_active AND c.label_id IS NOT NULL AND c.status = ANY(%(final)s)
GROUP BY 1, 2, 3
"""
_COUNTS_SQL = f"""
SELECT provenance, COUNT(*), COUNT(DISTINCT annotator_id) FROM {_VOTE}
WHERE project_id = %(project)s AND is_active GROUP BY 1
"""


def _pair_tables(sql: str, params: dict[str, Any]) -> dict[str, dict[tuple[int, int], int]]:
    tables: dict[str, dict[tuple[int, int], int]] = defaultdict(dict)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for mode, answer, reference, n in cursor.fetchall():
            tables[str(mode)][(int(answer), int(reference))] = int(n)
    return tables


def provenance_agreement(project: Project) -> list[dict[str, Any]]:
    """Per mode a vote was made in (provenance), how its active votes agree with the final consensus, with
    the experts' votes on the same patches, and with the independent votes (one at a time, no suggestion
    shown) of other annotators: the raw share and Cohen's kappa over the (vote, reference) pairs.

    So a project can see whether accepted suggestions are as good as independent votes. The consensus
    comparison includes the vote itself in what it is compared with (that is what the consensus is); the
    other two never compare a vote with its own annotator."""
    params = {
        "project": project.pk,
        "expert_roles": [Role.EXPERT.value, Role.ADMIN.value],
        "final": [Consensus.Status.AGREED.value, Consensus.Status.EXPERT.value],
    }
    with connection.cursor() as cursor:
        cursor.execute(_COUNTS_SQL, params)
        counts = {str(mode): (int(n), int(people)) for mode, n, people in cursor.fetchall()}
    references = {"consensus": _pair_tables(_CONSENSUS_SQL, params)}
    for name, condition in _REFERENCES.items():
        references[name] = _pair_tables(_PAIRS_SQL.format(reference=condition), params)
    rows = []
    for mode in sorted(counts):
        row: dict[str, Any] = {"provenance": mode, "n_votes": counts[mode][0], "n_annotators": counts[mode][1]}
        for name, tables in references.items():
            row[f"vs_{name}"] = asdict(pair_agreement(tables.get(mode, {})))
        rows.append(row)
    return rows
