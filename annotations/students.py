"""Students who improve: what the gold checks say of each crowd member, and what the project does with it.

A student's **gold answer** is their first vote on a gold patch (whatever they did after it: training
mode shows the expert's answer once they have voted, so a later correction or an undo and vote again
is not their own call). It is **correct** when it is the patch's expert label: the label every active
expert (and admin) vote on it gives (a gold patch whose experts disagree is left out). The counts live on
the student's ``Membership`` (``gold_answers``, ``gold_correct``), rewritten from the votes by one
statement (:func:`refresh_students`) after each of the student's votes on a gold check, when an admin
marks or unmarks a gold patch, changes the certification threshold or a member's role, and before every
batch recompute. A vote on a gold patch made outside a gold
check (a crowd task of a patch marked gold later) counts from the next refresh.

**Adaptive gold rate** (``Project.adaptive_gold``; off: ``gold_rate`` for everyone). The student's
accuracy on gold has a Beta(1 + correct, 1 + wrong) posterior (a uniform prior). With ``p`` the
posterior probability that their accuracy is below the target (the certification threshold when set,
else :data:`PROVEN_ACCURACY`)::

    rate = floor + (ceiling - floor) * p      floor = gold_rate / 3,  ceiling = min(3 * gold_rate, 0.5)

(the ceiling is never below ``gold_rate``). An unknown student (no answers) has ``p`` = the target, so
most of the ceiling; a weak one tends to the ceiling; a proven one (the posterior's mass above the
target) to the floor. The rate is drawn with the same reproducible coin as before, seeded by
(project seed, user, vote count), so the same history gives the same checks.

**Certification** (``Project.certification_threshold``, 0 = off). A student counts in consensus when
they have at least :data:`MIN_GOLD_FOR_CERTIFICATION` gold answers and a share correct at or above the
threshold. Until then their votes are recorded (and move their tasks along as any vote) but are left
out of consensus, on the per-vote path, in a bulk action's recompute and in the batch recompute
(Dawid-Skene included). Certification is a state, not a date: once a student is certified **all**
their votes count, the earlier ones too (they were the same person's answers, and Dawid-Skene weighs
them by the reliability it estimates), and the patches they voted on are recomputed at once; a
certified student who falls below the threshold again stops counting the same way. The patches whose
crowd votes were left out stay pending (fewer counted votes than the quorum) until then, or until a
round asks for them again.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone
from scipy.special import betainc

from . import prepared
from .domain.agreement import pair_agreement
from .models import Membership, Project, Role, Vote

MIN_GOLD_FOR_CERTIFICATION = 10
# The accuracy a student must be shown to have for adaptive gold when the project sets no certification threshold.
PROVEN_ACCURACY = 0.8
CEILING_FACTOR = 3.0
FLOOR_FACTOR = 1.0 / 3.0
MAX_ADAPTIVE_GOLD_RATE = 0.5

DEFAULT_BLOCK = 25
MIN_BLOCK, MAX_BLOCK = 5, 1000


# --- adaptive gold ---------------------------------------------------------------------------------------------


def target_accuracy(project: Project) -> float:
    return float(project.certification_threshold) if project.certification_threshold > 0 else PROVEN_ACCURACY


def adaptive_gold_rate(project: Project, gold_answers: int, gold_correct: int) -> float:
    """The student's gold rate under the module's rule (the project's ``gold_rate`` when adaptive gold is off)."""
    base = float(project.gold_rate)
    if not project.adaptive_gold or base <= 0:
        return base
    floor = base * FLOOR_FACTOR
    ceiling = max(base, min(base * CEILING_FACTOR, MAX_ADAPTIVE_GOLD_RATE))
    correct = max(0, int(gold_correct))
    wrong = max(0, int(gold_answers) - correct)
    below = float(betainc(1.0 + correct, 1.0 + wrong, target_accuracy(project)))  # P(accuracy < target)
    return floor + (ceiling - floor) * below


# One statement on every lease of a crowd member: their vote count (the coin's seed, as with a fixed rate) and,
# for adaptive gold, their gold counts from the membership row.
_GOLD_COIN_SQL = """
SELECT (SELECT COUNT(*) FROM annotations_vote WHERE project_id = %(project)s AND annotator_id = %(user)s),
       m.gold_answers, m.gold_correct
FROM (SELECT 1) AS one
LEFT JOIN annotations_membership m ON m.project_id = %(project)s AND m.user_id = %(user)s
"""


def wants_gold(project: Project, user: Any, ahead: int) -> bool:
    """A reproducible coin flip per (project, user, vote count) at the student's gold rate (one query).

    ``ahead`` counts the leases already held, so a lease taken ahead gets the flip of the vote it will become."""
    if project.gold_rate <= 0:
        return False
    if project.adaptive_gold:
        ((n_votes, answers, correct),) = prepared.rows(_GOLD_COIN_SQL, {"project": project.pk, "user": user.pk})
        rate = adaptive_gold_rate(project, answers or 0, correct or 0)
    else:
        n_votes, rate = Vote.objects.filter(project=project, annotator=user).count(), float(project.gold_rate)
    rng = random.Random(f"{project.seed}:{user.pk}:{n_votes + ahead}")
    return rng.random() < rate


# --- gold counts and certification -----------------------------------------------------------------------------


# Whether a membership row ``m`` counts in consensus: the rule of the module docstring, in SQL. A vote whose
# annotator is no longer a member (no row) is not judged.
def counts_sql(alias: str, answers: str = "gold_answers", correct: str = "gold_correct") -> str:
    return (
        f"({alias}.role IS NULL OR {alias}.role <> 'crowd' OR %(threshold)s::float8 <= 0"
        f" OR ({answers} >= %(minimum)s AND {correct} >= %(threshold)s::float8 * {answers}))"
    )


def certification_params(project: Project) -> dict[str, Any]:
    return {"threshold": float(project.certification_threshold), "minimum": MIN_GOLD_FOR_CERTIFICATION}


def is_certified(project: Project, gold_answers: int, gold_correct: int) -> bool:
    """The rule for one student (``counts_sql`` in Python): enough gold answers, enough of them right."""
    threshold = float(project.certification_threshold)
    return threshold <= 0 or (gold_answers >= MIN_GOLD_FOR_CERTIFICATION and gold_correct >= threshold * gold_answers)


# Every (or one) member's gold answers, their first vote on each gold patch with an expert label, counted and
# compared in PostgreSQL, and the membership rows rewritten in the same statement. ``old`` is the row before
# the update, so the statement returns whether each one counted in consensus before and counts now. For one
# member it walks the project's gold patches (the (project, is_gold) index) and looks up that member's votes on
# each along (patch, annotator); the member filter is spelled out, not optional, so the plan can use it.
def _refresh_sql(one: bool) -> str:
    voter = "AND v.annotator_id = %(user)s" if one else ""
    member = "AND old.user_id = %(user)s" if one else ""
    was = counts_sql("old", "old.gold_answers", "old.gold_correct")
    counts = counts_sql("old", "COALESCE(s.n, 0)", "COALESCE(s.ok, 0)")
    return f"""
WITH firsts AS (
    SELECT DISTINCT ON (v.annotator_id, v.patch_id) v.annotator_id, v.patch_id, v.label_id
    FROM annotations_patch p JOIN annotations_vote v ON v.patch_id = p.id {voter}
    WHERE p.project_id = %(project)s AND p.is_gold
    ORDER BY v.annotator_id, v.patch_id, v.created_at, v.id
), gold AS (
    SELECT e.patch_id, MIN(e.label_id) AS label_id FROM annotations_vote e
    WHERE e.patch_id IN (SELECT patch_id FROM firsts) AND e.is_active AND e.role IN ('expert', 'admin')
    GROUP BY e.patch_id HAVING COUNT(DISTINCT e.label_id) = 1
), stats AS (
    SELECT f.annotator_id, COUNT(*) AS n, COUNT(*) FILTER (WHERE f.label_id = g.label_id) AS ok
    FROM firsts f JOIN gold g ON g.patch_id = f.patch_id GROUP BY f.annotator_id
), fresh AS (
    SELECT old.id, COALESCE(s.n, 0) AS n, COALESCE(s.ok, 0) AS ok, {was} AS was, {counts} AS counts
    FROM annotations_membership old LEFT JOIN stats s ON s.annotator_id = old.user_id
    WHERE old.project_id = %(project)s {member}
)
UPDATE annotations_membership m
SET gold_answers = fresh.n, gold_correct = fresh.ok,
    certified_at = CASE WHEN fresh.counts AND NOT fresh.was AND m.role = 'crowd' THEN %(now)s ELSE m.certified_at END
FROM fresh WHERE m.id = fresh.id
RETURNING m.user_id, fresh.was, fresh.counts
"""


_REFRESH_ONE_SQL, _REFRESH_ALL_SQL = _refresh_sql(True), _refresh_sql(False)


def refresh_students(project: Project, user: Any = None, *, recompute: bool = True) -> list[int]:
    """Rewrite the gold counts of one member (``user``) or of every member of the project.

    Returns the ids of the members whose certification changed (they counted in consensus before and no longer
    do, or the other way round). With ``recompute``, the consensus of every patch they voted on is recomputed
    (the project's per-item method, in chunks). A batch recompute passes False, since it recomputes every
    patch itself."""
    params = {
        "project": project.pk,
        "user": getattr(user, "pk", user),
        "now": timezone.now(),
        **certification_params(project),
    }
    with connection.cursor() as cursor:
        cursor.execute(_REFRESH_ALL_SQL if params["user"] is None else _REFRESH_ONE_SQL, params)
        changed = [int(uid) for uid, was, counts in cursor.fetchall() if was != counts]
    if changed and recompute:
        recompute_students_patches(project, changed)
    return changed


def recompute_students_patches(project: Project, user_ids: list[int], chunk: int = 10_000) -> int:
    """Recompute the consensus of every patch these members voted on; returns the number of patches."""
    from .consensus import recompute_consensus_many

    ids = sorted(
        set(
            Vote.objects.filter(project=project, annotator_id__in=user_ids, is_active=True).values_list(
                "patch_id", flat=True
            )
        )
    )
    for start in range(0, len(ids), chunk):
        recompute_consensus_many(project, ids[start : start + chunk])
    return len(ids)


def uncounted_students(project: Project) -> set[int]:
    """The users whose crowd votes the project's consensus leaves out now (below the certification threshold)."""
    threshold = float(project.certification_threshold)
    if threshold <= 0:
        return set()
    below = Q(gold_answers__lt=MIN_GOLD_FOR_CERTIFICATION) | Q(gold_correct__lt=F("gold_answers") * threshold)
    return set(Membership.objects.filter(below, project=project, role=Role.CROWD).values_list("user_id", flat=True))


# --- the students' table and learning curves -------------------------------------------------------------------


def student_summary(project: Project, membership: Membership) -> dict[str, Any]:
    n, ok = membership.gold_answers, membership.gold_correct
    return {
        "user": membership.user_id,
        "username": membership.user.username,
        "role": membership.role,
        "gold_answers": n,
        "gold_correct": ok,
        "gold_accuracy": ok / n if n else None,
        "certified": is_certified(project, n, ok) if project.certification_threshold > 0 else None,
        "counts_in_consensus": membership.role != Role.CROWD or is_certified(project, n, ok),
        "certified_at": membership.certified_at.isoformat() if membership.certified_at else None,
        "gold_rate": adaptive_gold_rate(project, n, ok),
    }


def students(project: Project) -> dict[str, Any]:
    """The crowd members with what the gold checks say of them (one query), for admins."""
    rows = Membership.objects.filter(project=project, role=Role.CROWD).select_related("user").order_by("user__username")
    return {
        "certification_threshold": project.certification_threshold,
        "min_gold_answers": MIN_GOLD_FOR_CERTIFICATION,
        "adaptive_gold": project.adaptive_gold,
        "gold_rate": project.gold_rate,
        "students": [student_summary(project, m) for m in rows],
    }


@dataclass
class _Block:
    index: int
    n_answers: int = 0
    gold_answers: int = 0
    gold_correct: int = 0
    first: Any = None
    last: Any = None

    def __post_init__(self) -> None:
        self.pairs: dict[tuple[int, int], int] = defaultdict(int)


# The member's answers (first vote on each patch), numbered in the order they were given and cut into blocks;
# per block, label, the experts' label (null where no expert voted, or the experts disagree) and gold flag: how
# many.
# One member's votes, along the (project, annotator, created_at) index; nothing per vote leaves PostgreSQL.
_CURVE_SQL = """
WITH answers AS (
    SELECT DISTINCT ON (v.patch_id) v.patch_id, v.label_id, v.created_at, v.id
    FROM annotations_vote v WHERE v.project_id = %(project)s AND v.annotator_id = %(user)s
    ORDER BY v.patch_id, v.created_at, v.id
), numbered AS (
    SELECT a.*, (ROW_NUMBER() OVER (ORDER BY a.created_at, a.id) - 1) / %(block)s AS block FROM answers a
), experts AS (
    SELECT e.patch_id, MIN(e.label_id) AS label_id FROM annotations_vote e
    WHERE e.patch_id IN (SELECT patch_id FROM answers) AND e.is_active AND e.role IN ('expert', 'admin')
      AND e.annotator_id <> %(user)s
    GROUP BY e.patch_id HAVING COUNT(DISTINCT e.label_id) = 1
)
SELECT n.block, n.label_id, x.label_id, p.is_gold, COUNT(*), MIN(n.created_at), MAX(n.created_at)
FROM numbered n
JOIN annotations_patch p ON p.id = n.patch_id
LEFT JOIN experts x ON x.patch_id = n.patch_id
GROUP BY 1, 2, 3, 4
"""


# A learning curve is cached (shared by every server process) under a key that moves with everything it is
# computed from, so a cached curve is never stale for a change made through the platform:
# - the member's own votes: their latest vote (id and time, one index lookup), since their answers only grow;
# - the experts' labels and the gold set: a per-project stamp, replaced (after commit) whenever an expert's or
#   admin's vote is cast, corrected, undone or bulk-made, and when a patch is marked or unmarked gold. A vote's
#   role is recorded with it, and the certification threshold is no part of a curve. A random stamp, not a
#   counter: one the cache evicted is replaced by a new one, never reset to a value an old entry was stored under.
# Writes that bypass these paths (SQL imports, the Django admin) show after CURVE_CACHE_SECONDS at the latest.
CURVE_CACHE_SECONDS = 300
_LABELS_STAMP = "histoloop:curve-labels:{}"
_LATEST_VOTE_SQL = """
SELECT v.id, v.created_at FROM annotations_vote v WHERE v.project_id = %(project)s AND v.annotator_id = %(user)s
ORDER BY v.created_at DESC, v.id DESC LIMIT 1
"""


def reference_changed(project_id: int) -> None:
    """The students' reference changed in this project (an expert's or admin's vote, or the gold set): once the
    transaction commits, no cached learning curve of the project is used again."""
    transaction.on_commit(lambda: cache.set(_LABELS_STAMP.format(project_id), uuid.uuid4().hex, timeout=None))


def _labels_stamp(project_id: int) -> str:
    key = _LABELS_STAMP.format(project_id)
    stamp = cache.get(key)
    if stamp is None:
        cache.add(key, uuid.uuid4().hex, timeout=None)
        stamp = cache.get(key)
    return str(stamp)


def learning_curve(project: Project, user_id: int, block: int = DEFAULT_BLOCK) -> dict[str, Any]:
    """:func:`compute_learning_curve`, from the cache while nothing it is computed from has changed."""
    # Both parts of the key are read before the curve is computed: a change committed meanwhile moves the key,
    # so a curve stored under the old one is never read again.
    stamp = _labels_stamp(project.pk)
    latest = prepared.rows(_LATEST_VOTE_SQL, {"project": project.pk, "user": user_id})
    mine = f"{latest[0][0]}:{latest[0][1].timestamp():.6f}" if latest else "none"
    key = f"histoloop:curve:{project.pk}:{project.created_at.timestamp():.6f}:{user_id}:{block}:{mine}:{stamp}"
    body = cache.get(key)
    if body is None:
        body = compute_learning_curve(project, user_id, block)
        cache.set(key, body, CURVE_CACHE_SECONDS)
    return body


def compute_learning_curve(project: Project, user_id: int, block: int = DEFAULT_BLOCK) -> dict[str, Any]:
    """A member's gold accuracy and Cohen's kappa against the experts, block by block of ``block`` answers.

    An answer is the member's first vote on a patch; the experts' label is the one the active expert and admin
    votes on the patch (other than the member's own) all give, gold patches included. A block's kappa is over
    its answers on patches the experts decided; None where it is undefined (no such answer, one label on both sides)."""
    blocks: dict[int, _Block] = {}
    with connection.cursor() as cursor:
        cursor.execute(_CURVE_SQL, {"project": project.pk, "user": user_id, "block": block})
        for index, label, reference, is_gold, count, first, last in cursor.fetchall():
            entry = blocks.setdefault(int(index), _Block(int(index)))
            entry.n_answers += int(count)
            entry.first = first if entry.first is None or first < entry.first else entry.first
            entry.last = last if entry.last is None or last > entry.last else entry.last
            if reference is not None:
                entry.pairs[(int(label), int(reference))] += int(count)
                if is_gold:
                    entry.gold_answers += int(count)
                    entry.gold_correct += int(count) if label == reference else 0
    out = []
    start = 0
    for index in sorted(blocks):
        entry = blocks[index]
        score = pair_agreement(entry.pairs)
        out.append(
            {
                "block": index,
                "first_answer": start + 1,
                "last_answer": start + entry.n_answers,
                "n_answers": entry.n_answers,
                "from": entry.first.isoformat(),
                "to": entry.last.isoformat(),
                "gold_answers": entry.gold_answers,
                "gold_correct": entry.gold_correct,
                "gold_accuracy": entry.gold_correct / entry.gold_answers if entry.gold_answers else None,
                "n_expert_pairs": score.n_pairs,
                "agreement_with_experts": score.agreement,
                "kappa_vs_experts": score.kappa,
            }
        )
        start += entry.n_answers
    return {"user": user_id, "block_size": block, "blocks": out}
