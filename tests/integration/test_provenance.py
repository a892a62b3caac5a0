"""How a vote was made, through the API: the suggestion weight in every consensus path (single votes, bulk
actions, the batch recompute on a real worker), refused settings, the agreement report split by provenance,
and labelling speed per annotator and mode from votes with known timestamps."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from annotations import consensus, speed
from annotations.models import Consensus, Project, Role, Vote
from learner.models import ModelVersion, TrainingRound
from tests.factories import PatchFactory, ProjectFactory, SlideFactory, api_client, member
from tests.integration.conftest import wait_for

ACCEPTED = Vote.Provenance.ACCEPTED_SUGGESTION


def _model_version(project: Project, **metrics: Any) -> ModelVersion:
    round_ = TrainingRound.objects.create(project=project, number=1, state="succeeded", metrics=metrics)
    names = list(project.label_classes.order_by("order").values_list("name", flat=True))
    return ModelVersion.objects.create(
        project=project, round=round_, backbone="test", train_mode="head", weights_path="", class_names=names
    )


def _setup(**project_fields: Any) -> tuple[Project, list[Any], Any, list[Any], ModelVersion]:
    """A majority-vote project, three patches, one expert who labels by hand and two who accept the strip."""
    project = ProjectFactory(consensus_method="majority", votes_required=1, **project_fields)
    patches = PatchFactory.create_batch(3, slide=SlideFactory(project=project))
    hand = member(project, Role.EXPERT, username="by_hand")
    strip = [member(project, Role.EXPERT, username=f"by_strip_{i}") for i in (1, 2)]
    return project, patches, hand, strip, _model_version(project)


def _vote(user: Any, project: Project, patch: Any, label: str) -> Any:
    body = {"patch": patch.pk, "label": label}
    response = api_client(user).post(f"/api/v1/projects/{project.pk}/votes/", body, format="json")
    assert response.status_code == 201, response.content
    return response


def _accept(user: Any, project: Project, version: ModelVersion, patches: list[Any], label: str) -> None:
    body = {"label": label, "model_version": version.pk, "accept": [p.pk for p in patches]}
    response = api_client(user).post(f"/api/v1/projects/{project.pk}/suggestions/accept/", body, format="json")
    assert response.status_code == 201, response.content


def _patch_weight(admin: Any, project: Project, value: Any) -> Any:
    return api_client(admin).patch(f"/api/v1/projects/{project.pk}/", {"suggestion_weight": value}, format="json")


def _consensus(patch: Any) -> Consensus:
    return Consensus.objects.select_related("label").get(patch=patch)


# --- the weight in each consensus path ------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("weight", "label", "status", "vote_count"),
    [
        (1.0, "squamous", "expert", 3),  # two accepted suggestions outvote one hand label
        (0.4, "benign", "expert", 3),  # 2 x 0.4 < 1
        (0.5, "benign", "contested", 3),  # 2 x 0.5 = 1: a tie, the first label in order, contested
        (0.0, "benign", "expert", 1),  # left out: only the hand label counts
    ],
)
def test_each_vote_counts_accepted_suggestions_with_the_projects_weight(
    weight: float, label: str, status: str, vote_count: int
) -> None:
    project, (patch, *_), hand, strip, version = _setup(suggestion_weight=weight)
    _vote(hand, project, patch, "benign")
    for user in strip:
        _accept(user, project, version, [patch], "squamous")
    row = _consensus(patch)
    assert (row.label.name, row.status, row.vote_count) == (label, status, vote_count)
    # The batch recompute gives the same answer as the per-vote path.
    consensus.recompute_project_consensus(project)
    row = _consensus(patch)
    assert (row.label.name, row.status, row.vote_count) == (label, status, vote_count)


@pytest.mark.django_db
def test_a_patch_whose_only_votes_are_excluded_suggestions_is_pending() -> None:
    project, (patch, *_), _, strip, version = _setup(suggestion_weight=0.0)
    _accept(strip[0], project, version, [patch], "squamous")
    row = _consensus(patch)
    assert (row.label, row.status, row.vote_count) == (None, "pending", 0)


@pytest.mark.django_db
def test_a_bulk_action_recomputes_with_the_weight_of_the_suggestions_already_on_its_patches() -> None:
    project, patches, hand, strip, version = _setup(suggestion_weight=0.4)
    for user in strip:
        _accept(user, project, version, patches[:2], "squamous")
    assert _consensus(patches[0]).label.name == "squamous"
    body = {"patches": [p.pk for p in patches], "label": "benign"}
    response = api_client(hand).post(f"/api/v1/projects/{project.pk}/votes/bulk/", body, format="json")
    assert response.status_code == 201, response.content
    # 1 bulk vote against 2 x 0.4: benign; at full weight the two suggestions would have won.
    assert [_consensus(p).label.name for p in patches] == ["benign", "benign", "benign"]
    Project.objects.filter(pk=project.pk).update(suggestion_weight=1.0)
    project.refresh_from_db()
    consensus.recompute_consensus_many(project, [p.pk for p in patches])
    assert [_consensus(p).label.name for p in patches] == ["squamous", "squamous", "benign"]


@pytest.mark.django_db
def test_the_batch_recompute_weights_suggestions_for_dawid_skene_too() -> None:
    project = ProjectFactory(consensus_method="dawid_skene", votes_required=3, suggestion_strip="both")
    patches = PatchFactory.create_batch(4, slide=SlideFactory(project=project))
    version = _model_version(project)
    crowd = [member(project, Role.CROWD, username=f"student{i}") for i in range(3)]
    labels = {lc.name: lc for lc in project.label_classes.all()}
    target = patches[0]
    # One student labels the target by hand; two accept the model's (wrong) suggestion on it.
    Vote.objects.create(project=project, patch=target, annotator=crowd[0], label=labels["benign"], role=Role.CROWD)
    for student in crowd[1:]:
        _accept(student, project, version, [target], "squamous")
    for patch in patches[1:]:  # the students agree elsewhere, so Dawid-Skene has something to fit
        for student in crowd:
            label = labels["adenocarcinoma"]
            Vote.objects.create(project=project, patch=patch, annotator=student, label=label, role=Role.CROWD)
    consensus.recompute_project_consensus(project)
    assert _consensus(target).label.name == "squamous"
    full = _consensus(target).posterior["squamous"]
    Project.objects.filter(pk=project.pk).update(suggestion_weight=0.3)
    project.refresh_from_db()
    consensus.recompute_project_consensus(project)
    softened = _consensus(target)
    assert softened.posterior["squamous"] < full
    assert softened.label.name == "benign" and softened.vote_count == 3
    Project.objects.filter(pk=project.pk).update(suggestion_weight=0.0)
    project.refresh_from_db()
    consensus.recompute_project_consensus(project)
    left_out = _consensus(target)
    assert (left_out.label, left_out.status, left_out.vote_count) == (None, "pending", 1)  # one vote, quorum 3


@pytest.mark.django_db(transaction=True)
def test_changing_the_weight_recomputes_the_project_on_the_worker(celery_worker_process: Any) -> None:
    project, patches, hand, strip, version = _setup()
    admin = member(project, Role.ADMIN)
    for patch in patches:
        _vote(hand, project, patch, "benign")
    for user in strip:
        _accept(user, project, version, patches, "squamous")
    assert {_consensus(p).label.name for p in patches} == {"squamous"}

    response = _patch_weight(admin, project, 0)
    assert response.status_code == 200 and response.json()["suggestion_weight"] == 0.0
    assert response.json()["consensus_recompute"] == "queued"
    wait_for(
        lambda: all(_consensus(p).label.name == "benign" and _consensus(p).vote_count == 1 for p in patches),
        message="the worker to recompute without the accepted suggestions",
    )
    assert _patch_weight(admin, project, 1).status_code == 200
    wait_for(
        lambda: all(_consensus(p).label.name == "squamous" and _consensus(p).vote_count == 3 for p in patches),
        message="the worker to recompute with them again",
    )


@pytest.mark.django_db
@pytest.mark.parametrize("bad", [1.5, -0.1, "a lot", "NaN", None, [0.5]])
def test_a_bad_weight_is_refused_and_changes_nothing(bad: Any, django_capture_on_commit_callbacks: Any) -> None:
    project, (patch, *_), hand, strip, version = _setup(suggestion_weight=0.4)
    admin = member(project, Role.ADMIN)
    _vote(hand, project, patch, "benign")
    for user in strip:
        _accept(user, project, version, [patch], "squamous")
    before = _consensus(patch)
    with django_capture_on_commit_callbacks() as callbacks:
        response = _patch_weight(admin, project, bad)
    assert response.status_code == 400
    assert "suggestion_weight" in response.json()
    assert not callbacks, "nothing may be recomputed"
    project.refresh_from_db()
    assert project.suggestion_weight == 0.4
    after = _consensus(patch)
    assert (after.label_id, after.status, after.updated_at) == (before.label_id, before.status, before.updated_at)


@pytest.mark.django_db
def test_only_admins_change_the_weight_and_an_unchanged_weight_recomputes_nothing(
    django_capture_on_commit_callbacks: Any,
) -> None:
    project, _, hand, _, _ = _setup(suggestion_weight=0.4)
    assert _patch_weight(hand, project, 0.0).status_code == 403
    project.refresh_from_db()
    assert project.suggestion_weight == 0.4
    admin = member(project, Role.ADMIN)
    with django_capture_on_commit_callbacks() as callbacks:
        response = _patch_weight(admin, project, 0.4)
    assert response.status_code == 200 and "consensus_recompute" not in response.json()
    assert not callbacks
    with django_capture_on_commit_callbacks() as callbacks:
        assert _patch_weight(admin, project, 0.7).json()["consensus_recompute"] == "queued"
    assert len(callbacks) == 1


# --- agreement split by provenance ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_agreement_report_compares_each_provenance_with_experts_and_independent_votes() -> None:
    project = ProjectFactory(consensus_method="majority", votes_required=1)
    patches = PatchFactory.create_batch(4, slide=SlideFactory(project=project))
    labels = {lc.name: lc for lc in project.label_classes.all()}
    expert = member(project, Role.EXPERT, username="dr_truth")
    blind = member(project, Role.CROWD, username="blind")
    shown = member(project, Role.CROWD, username="shown")
    truth = ["benign", "squamous", "benign", "squamous"]
    # The student who accepted suggestions is right on half; the blind one on all.
    accepted = ["benign", "squamous", "squamous", "benign"]
    for patch, right, took in zip(patches, truth, accepted, strict=True):
        Vote.objects.create(project=project, patch=patch, annotator=expert, label=labels[right], role=Role.EXPERT)
        Vote.objects.create(project=project, patch=patch, annotator=blind, label=labels[right], role=Role.CROWD)
        Vote.objects.create(
            project=project, patch=patch, annotator=shown, label=labels[took], role=Role.CROWD, provenance=ACCEPTED
        )
        consensus.recompute_consensus(project, patch)
    body = api_client(expert).get(f"/api/v1/projects/{project.pk}/agreement/").json()
    rows = {row["provenance"]: row for row in body["provenance"]}
    assert set(rows) == {"manual", "accepted-suggestion"}
    sugg, manual = rows["accepted-suggestion"], rows["manual"]
    assert (sugg["n_votes"], sugg["n_annotators"], manual["n_votes"], manual["n_annotators"]) == (4, 1, 8, 2)
    assert sugg["vs_experts"]["n_pairs"] == 4 and sugg["vs_experts"]["agreement"] == pytest.approx(0.5)
    # Against both blind voters' votes (the expert's and the student's): 8 pairs, half agree.
    assert sugg["vs_independent"]["n_pairs"] == 8 and sugg["vs_independent"]["agreement"] == pytest.approx(0.5)
    # Two labels used evenly on both sides: chance agreement 1/2, so half right is kappa 0.
    assert sugg["vs_experts"]["kappa"] == pytest.approx(0.0)
    # The blind student against the expert (the expert has no other expert to compare with).
    assert manual["vs_experts"] == {"n_pairs": 4, "agreement": 1.0, "kappa": 1.0}
    # Against the consensus (majority of 3: the expert and blind student agree): every manual vote is in it.
    assert manual["vs_consensus"]["agreement"] == pytest.approx(1.0)
    assert sugg["vs_consensus"]["agreement"] == pytest.approx(0.5)


# --- labelling speed --------------------------------------------------------------------------------------------------


def _timed(project: Project, user: Any, patch: Any, at: Any, provenance: str, spent_ms: int = 0, **kw: Any) -> Vote:
    label = project.label_classes.order_by("order").first()
    vote = Vote.objects.create(
        project=project,
        patch=patch,
        annotator=user,
        label=label,
        role=kw.pop("role", Role.EXPERT),
        provenance=provenance,
        time_spent_ms=spent_ms,
        **kw,
    )
    Vote.objects.filter(pk=vote.pk).update(created_at=at)  # auto_now_add: set the known time afterwards
    return vote


@pytest.mark.django_db
def test_labelling_speed_per_annotator_and_mode_from_known_timestamps() -> None:
    project = ProjectFactory()
    patches = PatchFactory.create_batch(30, slide=SlideFactory(project=project))
    alice = member(project, Role.EXPERT, username="alice")
    bob = member(project, Role.EXPERT, username="bob")
    importer = member(project, Role.EXPERT, username="importer")
    t0 = timezone.now() - timedelta(hours=2)
    sec = timedelta(seconds=1)
    # Alice: three single votes (the first measured by her client: 8 s; then gaps of 10 s and 20 s) ...
    _timed(project, alice, patches[0], t0, "manual", spent_ms=8000)
    _timed(project, alice, patches[1], t0 + 10 * sec, "manual")
    _timed(project, alice, patches[2], t0 + 30 * sec, "manual")
    # ... a lasso of 5 a minute later (the minute is the first vote's, the rest cost nothing) ...
    for i in range(5):
        _timed(project, alice, patches[3 + i], t0 + 90 * sec + timedelta(microseconds=i), "bulk")
    # ... an undone vote (not a label) and, after a break, one more single vote her client timed at 4 s.
    _timed(project, alice, patches[8], t0 + 100 * sec, "manual", is_active=False, retracted_at=t0 + 101 * sec)
    _timed(project, alice, patches[9], t0 + 2000 * sec, "manual", spent_ms=4000)
    # Bob accepts ten suggestions two seconds apart (his first vote has no time of its own).
    for i in range(10):
        _timed(project, bob, patches[10 + i], t0 + i * 2 * sec, ACCEPTED)
    # An import is not labelling in the platform.
    for i in range(5):
        _timed(project, importer, patches[20 + i], t0 + i * sec, "label-import")
    # Older than the window asked for.
    _timed(project, bob, patches[25], t0 - timedelta(days=3), "similar")

    client = api_client(alice)
    body = client.get(f"/api/v1/projects/{project.pk}/labelling-speed/?days=1").json()
    modes = body["modes"]
    assert set(modes) == {"manual", "bulk", "accepted-suggestion"}
    assert modes["manual"] == {"labels": 4, "seconds": pytest.approx(42.0), "per_hour": pytest.approx(4 * 3600 / 42)}
    assert modes["bulk"]["labels"] == 5 and modes["bulk"]["seconds"] == pytest.approx(60.0, abs=1e-3)
    assert modes["bulk"]["per_hour"] == pytest.approx(300.0, rel=1e-4)
    assert modes["accepted-suggestion"] == {"labels": 10, "seconds": 18.0, "per_hour": 2000.0}
    people = {a["username"]: a for a in body["annotators"]}
    assert set(people) == {"alice", "bob"}
    assert people["alice"]["labels"] == 9 and people["alice"]["seconds"] == pytest.approx(102.0, abs=1e-3)
    assert people["alice"]["modes"]["bulk"]["labels"] == 5
    assert people["bob"]["modes"] == {"accepted-suggestion": {"labels": 10, "seconds": 18.0, "per_hour": 2000.0}}
    # A wider window takes Bob's old vote in (alone after a long gap, with no time of its own: no speed).
    cache_free = speed.labelling_speed(project, t0 - timedelta(days=4))
    assert cache_free["modes"]["similar"] == {"labels": 1, "seconds": 0.0, "per_hour": None}

    assert body["latest_model"] is None
    for bad in ("0", "400", "x", "-1", "9" * 5000, "１"):
        response = client.get(f"/api/v1/projects/{project.pk}/labelling-speed/?days={bad}")
        assert response.status_code == 400 and "days" in response.json()["detail"]
    crowd = api_client(member(project, Role.CROWD))
    assert crowd.get(f"/api/v1/projects/{project.pk}/labelling-speed/").status_code == 403


@pytest.mark.django_db
def test_the_latest_models_labels_are_split_by_the_mode_their_votes_were_made_in() -> None:
    project, patches, hand, strip, version = _setup()
    for patch in patches:
        _vote(hand, project, patch, "benign")
    _accept(strip[0], project, version, patches[:2], "benign")
    counts = speed.trained_label_modes(project)
    assert counts == {"manual": 3, "accepted-suggestion": 2}
    # What a round records at its snapshot is what the dashboard reads back for its model.
    TrainingRound.objects.filter(pk=version.round_id).update(metrics={"label_provenance": counts})
    body = api_client(hand).get(f"/api/v1/projects/{project.pk}/labelling-speed/").json()
    latest = body["latest_model"]
    assert latest["model_version"] == version.pk and latest["votes"] == counts
    assert latest["shares"] == {"accepted-suggestion": pytest.approx(0.4), "manual": pytest.approx(0.6)}


@pytest.mark.django_db(transaction=True)
def test_a_round_records_how_the_labels_it_trained_on_were_made() -> None:
    from annotations.bulk_voting import cast_bulk_votes
    from learner import pipeline
    from tests.integration.test_rounds import lung_project

    project = lung_project(per_class=4, labelled_per_class=3)  # 9 patches, each labelled by one expert's hand
    second = member(project, Role.EXPERT, username="second_opinion")
    for row in Consensus.objects.filter(project=project, label__isnull=False).order_by("patch_id")[:3]:
        cast_bulk_votes(project, second, Role.EXPERT, patch_ids=[row.patch_id], label=row.label_id)
    result = pipeline.run_round(TrainingRound.objects.create(project=project, number=1).pk)
    assert result.state == "succeeded", result.error
    assert result.metrics["label_provenance"] == {"manual": 9, "bulk": 3}
    # A vote cast after the snapshot does not change what the model is said to have learnt from.
    unlabelled = project.patches.exclude(consensus__label__isnull=False).first()
    Vote.objects.create(
        project=project, patch=unlabelled, annotator=second, label=project.label_classes.first(), role=Role.EXPERT
    )
    consensus.recompute_consensus(project, unlabelled)
    latest = api_client(second).get(f"/api/v1/projects/{project.pk}/labelling-speed/").json()["latest_model"]
    assert latest["round"] == 1 and latest["votes"] == {"manual": 9, "bulk": 3}
    assert latest["shares"] == {"bulk": pytest.approx(0.25), "manual": pytest.approx(0.75)}
