"""REST API for projects, members, labels, the queue and votes. Views validate and call services."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from . import consensus, hot_path, queue, stats, students, voting
from .member_cache import member_project
from .models import AnnotationTask, Consensus, LabelClass, Membership, Patch, Project, Role, Vote
from .permissions import project_for, projects_with_roles
from .serializers import (
    MAX_ID,
    AdminTaskPageSerializer,
    AdminTaskSerializer,
    ConsensusSerializer,
    CorrectionInputSerializer,
    CorrectionResultSerializer,
    GoldInputSerializer,
    LabelClassSerializer,
    MembershipSerializer,
    NextTaskSerializer,
    PatchDetailSerializer,
    PatchSerializer,
    ProjectSerializer,
    RoleInputSerializer,
    SkipResultSerializer,
    TaskSerializer,
    UndoResultSerializer,
    VoteInputSerializer,
    VoteResultSerializer,
    VoteSerializer,
)

ADMIN_ONLY = (Role.ADMIN,)
EXPERTS = (Role.ADMIN, Role.EXPERT)


def _error(exc: queue.QueueError) -> Response:
    return Response({"detail": str(exc)}, status=exc.status_code)


def query_id(request: Request, name: str) -> int | None:
    """An optional ``?name=<id>`` parameter: None when absent, ValidationError (400) unless an id."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_ID:
        raise ValidationError({name: f"Give the {name} as a whole number id, not {raw[:20]!r}."})
    return int(raw)


class ProjectScoped(APIView):
    """Resolves ``project_id`` for the caller; non-members get 404, wrong roles 403."""

    roles: tuple[str, ...] | None = None
    write_roles: tuple[str, ...] | None = ADMIN_ONLY
    # True for views that never change the project: the membership and project come from
    # annotations.member_cache instead of a query per request.
    remembered_membership = False

    def load(self, request: Request, project_id: int) -> tuple[Project, str]:
        roles = self.roles
        if request.method not in ("GET", "HEAD", "OPTIONS") and self.write_roles is not None:
            roles = self.write_roles
        if self.remembered_membership:
            return member_project(request.user, project_id, roles=roles)
        return project_for(request.user, project_id, roles=roles)


class ProjectListView(APIView):
    @extend_schema(responses=ProjectSerializer(many=True))
    def get(self, request: Request) -> Response:
        rows = projects_with_roles(request.user)
        roles = {project.pk: role for project, role in rows}
        return Response(ProjectSerializer([p for p, _ in rows], many=True, context={"roles": roles}).data)

    @extend_schema(request=ProjectSerializer, responses={201: ProjectSerializer})
    def post(self, request: Request) -> Response:
        if not request.user.is_staff:
            raise PermissionDenied("Only staff can create projects; ask an administrator.")
        serializer = ProjectSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            project = serializer.save(created_by=request.user)
            Membership.objects.create(user=request.user, project=project, role=Role.ADMIN)
        return Response(
            ProjectSerializer(project, context={"roles": {project.pk: Role.ADMIN}}).data, status=status.HTTP_201_CREATED
        )


class ProjectDetailView(ProjectScoped):
    @extend_schema(responses=ProjectSerializer)
    def get(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        return Response(ProjectSerializer(project, context={"roles": {project.pk: role}}).data)

    @extend_schema(request=ProjectSerializer, responses=ProjectSerializer)
    def patch(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        serializer = ProjectSerializer(project, data=request.data, partial=True, context={"roles": {project.pk: role}})
        serializer.is_valid(raise_exception=True)
        weight_before, threshold_before = project.suggestion_weight, project.certification_threshold
        with transaction.atomic():
            serializer.save()
            recompute = project.suggestion_weight != weight_before
            if project.certification_threshold != threshold_before:
                # Who is certified now (at once, for the per-vote path), then every patch in bulk on the worker.
                students.refresh_students(project, recompute=False)
                recompute = True
            if recompute:
                # Every suggestion-made vote now counts differently: the whole project, in bulk, on the worker.
                consensus.schedule_project_recompute(project)
        body = dict(serializer.data)
        if recompute:
            body["consensus_recompute"] = "queued"
        return Response(body)


class LabelListView(ProjectScoped):
    @extend_schema(responses=LabelClassSerializer(many=True))
    def get(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        return Response(LabelClassSerializer(project.label_classes.all(), many=True).data)

    @extend_schema(request=LabelClassSerializer, responses={201: LabelClassSerializer})
    def post(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        serializer = LabelClassSerializer(data=request.data, context={"project": project})
        serializer.is_valid(raise_exception=True)
        serializer.save(project=project)
        return Response(serializer.data, status=status.HTTP_201_CREATED)


class LabelDetailView(ProjectScoped):
    @extend_schema(request=LabelClassSerializer, responses=LabelClassSerializer)
    def patch(self, request: Request, project_id: int, label_id: int) -> Response:
        project, _ = self.load(request, project_id)
        label = LabelClass.objects.filter(project=project, pk=label_id).first()
        if label is None:
            return Response({"detail": "No such label in this project."}, status=404)
        serializer = LabelClassSerializer(label, data=request.data, partial=True, context={"project": project})
        serializer.is_valid(raise_exception=True)
        serializer.save()
        return Response(serializer.data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, project_id: int, label_id: int) -> Response:
        project, _ = self.load(request, project_id)
        label = LabelClass.objects.filter(project=project, pk=label_id).first()
        if label is None:
            return Response({"detail": "No such label in this project."}, status=404)
        if Vote.objects.filter(label=label).exists():
            return Response({"detail": "This label has votes; rename it instead of deleting it."}, status=409)
        label.delete()
        return Response(status=204)


class MemberListView(ProjectScoped):
    roles = ADMIN_ONLY

    @extend_schema(responses=MembershipSerializer(many=True))
    def get(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        members = Membership.objects.filter(project=project).select_related("user").order_by("user__username")
        return Response(MembershipSerializer(members, many=True).data)

    @extend_schema(request=MembershipSerializer, responses={201: MembershipSerializer})
    def post(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        serializer = MembershipSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        if Membership.objects.filter(project=project, user=serializer.validated_data["user"]).exists():
            return Response({"detail": "This user is already a member; change their role instead."}, status=409)
        serializer.save(project=project)
        return Response(serializer.data, status=status.HTTP_201_CREATED)


class MemberDetailView(ProjectScoped):
    roles = ADMIN_ONLY

    @extend_schema(request=MembershipSerializer, responses=MembershipSerializer)
    def patch(self, request: Request, project_id: int, member_id: int) -> Response:
        project, _ = self.load(request, project_id)
        membership = Membership.objects.filter(project=project, pk=member_id).first()
        if membership is None:
            return Response({"detail": "No such member in this project."}, status=404)
        data = RoleInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        membership.role = data.validated_data["role"]
        membership.save(update_fields=["role"])
        if project.certification_threshold > 0 and students.refresh_students(project, membership.user_id) == []:
            # A student's crowd votes are judged, an expert's are not: theirs count differently from now on.
            students.recompute_students_patches(project, [membership.user_id])
        return Response(MembershipSerializer(membership).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, project_id: int, member_id: int) -> Response:
        project, _ = self.load(request, project_id)
        deleted, _ = Membership.objects.filter(project=project, pk=member_id).delete()
        if not deleted:
            return Response({"detail": "No such member in this project."}, status=404)
        return Response(status=204)


class NextTaskView(ProjectScoped):
    """Lease the next task (GET and POST both lease; a held lease is returned again).

    ``?ahead=1`` also returns the user's second lease as ``"ahead"`` (held already, or leased
    now; null when nothing is left), so the annotator can load it while the first is labelled."""

    write_roles = None
    remembered_membership = True

    @extend_schema(
        request=None,
        parameters=[OpenApiParameter("ahead", OpenApiTypes.BOOL, description="Also return a second lease.")],
        responses={200: NextTaskSerializer, 204: None},
    )
    def post(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        body = hot_path.next_task_answer(
            project, request.user, role, ahead=hot_path.truthy(request.query_params.get("ahead", ""))
        )
        if body is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(body)

    get = post


MAX_TASK_PAGE = 500


class TaskListView(ProjectScoped):
    """The queue as its admins inspect it: tasks newest first, with each one's ``route_reason`` (why it went
    to the crowd or the experts). Filters ``kind``, ``state`` and ``round``; pages of ``limit`` (at most
    MAX_TASK_PAGE) continue with ``before`` = the last id seen (keyset: any queue size, one indexed query)."""

    roles = ADMIN_ONLY

    @extend_schema(
        parameters=[
            OpenApiParameter("kind", str, enum=list(AnnotationTask.Kind.values)),
            OpenApiParameter("state", str, enum=list(AnnotationTask.State.values)),
            OpenApiParameter("round", int),
            OpenApiParameter("before", int),
            OpenApiParameter("limit", int),
        ],
        responses=AdminTaskPageSerializer,
    )
    def get(self, request: Request, project_id: int) -> Response:
        project, _ = self.load(request, project_id)
        tasks = AnnotationTask.objects.filter(project=project)
        for name, choices in (("kind", AnnotationTask.Kind.values), ("state", AnnotationTask.State.values)):
            value = request.query_params.get(name)
            if value:
                if value not in choices:
                    raise ValidationError({name: f"Use one of {sorted(choices)}, not {value[:20]!r}."})
                tasks = tasks.filter(**{name: value})
        round_id = query_id(request, "round")
        if round_id is not None:
            tasks = tasks.filter(round_id=round_id)
        before = query_id(request, "before")
        if before is not None:
            tasks = tasks.filter(pk__lt=before)
        limit = query_id(request, "limit") or 100
        if not 1 <= limit <= MAX_TASK_PAGE:
            raise ValidationError({"limit": f"Give a limit from 1 to {MAX_TASK_PAGE}."})
        page = list(tasks.order_by("-id")[:limit])
        return Response(
            {
                "results": AdminTaskSerializer(page, many=True).data,
                "next_before": page[-1].pk if len(page) == limit else None,
            }
        )


class SkipTaskView(ProjectScoped):
    write_roles = None

    @extend_schema(request=None, responses=SkipResultSerializer)
    def post(self, request: Request, project_id: int, task_id: int) -> Response:
        project, _ = self.load(request, project_id)
        try:
            task = queue.release_task(project, request.user, task_id)
        except queue.QueueError as exc:
            return _error(exc)
        return Response({"id": task.pk, "state": task.state})


class VoteListView(ProjectScoped):
    write_roles = None
    remembered_membership = True

    @extend_schema(
        parameters=[OpenApiParameter("patch", OpenApiTypes.INT, description="Only the votes on this patch.")],
        responses=VoteSerializer(many=True),
    )
    def get(self, request: Request, project_id: int) -> Response:
        """Experts and admins see every vote; crowd members see only their own."""
        project, role = self.load(request, project_id)
        patch_id = query_id(request, "patch")
        votes = Vote.objects.filter(project=project).select_related("annotator", "label").order_by("-created_at")
        if role == Role.CROWD:
            votes = votes.filter(annotator=request.user)
        if patch_id is not None:
            votes = votes.filter(patch_id=patch_id)
        return Response(VoteSerializer(votes[:500], many=True).data)

    @extend_schema(request=VoteInputSerializer, responses={201: VoteResultSerializer})
    def post(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        data = VoteInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        code, body = hot_path.vote_answer(project, request.user, role, data.validated_data)
        return Response(body, status=code)


class VoteCorrectView(ProjectScoped):
    write_roles = None

    @extend_schema(request=CorrectionInputSerializer, responses={201: CorrectionResultSerializer})
    def post(self, request: Request, project_id: int, vote_id: int) -> Response:
        project, role = self.load(request, project_id)
        data = CorrectionInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            outcome = voting.correct_vote(
                project, request.user, role, vote_id=vote_id, label=data.validated_data["label"]
            )
        except queue.QueueError as exc:
            return _error(exc)
        return Response({"vote": VoteSerializer(outcome.vote).data}, status=status.HTTP_201_CREATED)


class UndoVoteView(ProjectScoped):
    write_roles = None

    @extend_schema(request=None, responses=UndoResultSerializer)
    def post(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        try:
            task = voting.undo_last_vote(project, request.user)
        except queue.QueueError as exc:
            return _error(exc)
        return Response({"task": TaskSerializer(task, context={"role": role}).data if task else None})


class PatchDetailView(ProjectScoped):
    write_roles = None

    @extend_schema(responses=PatchDetailSerializer)
    def get(self, request: Request, project_id: int, patch_id: int) -> Response:
        """Blind labelling: crowd members see votes/consensus only for patches they voted on, and only
        their own votes."""
        project, role = self.load(request, project_id)
        patch = Patch.objects.filter(project=project, pk=patch_id).select_related("slide", "project").first()
        if patch is None:
            return Response({"detail": "No such patch in this project."}, status=404)
        body: dict[str, Any] = {"patch": PatchSerializer(patch, context={"role": role}).data}
        votes = Vote.objects.filter(patch=patch).select_related("annotator", "label")
        consensus = Consensus.objects.filter(patch=patch).select_related("label").first()
        if role == Role.CROWD:
            own = votes.filter(annotator=request.user)
            body["votes"] = VoteSerializer(own, many=True).data
            voted = own.filter(is_active=True).exists()
            body["consensus"] = ConsensusSerializer(consensus).data if (voted and consensus) else None
        else:
            body["votes"] = VoteSerializer(votes, many=True).data
            body["consensus"] = ConsensusSerializer(consensus).data if consensus else None
        return Response(body)


class PatchGoldView(ProjectScoped):
    roles = ADMIN_ONLY

    @extend_schema(request=GoldInputSerializer, responses=PatchSerializer)
    def post(self, request: Request, project_id: int, patch_id: int) -> Response:
        """Mark an expert-labelled patch as gold (``{"gold": false}`` unmarks it)."""
        project, _ = self.load(request, project_id)
        data = GoldInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        patch = Patch.objects.filter(project=project, pk=patch_id).first()
        if patch is None:
            return Response({"detail": "No such patch in this project."}, status=404)
        gold = data.validated_data["gold"]
        if gold and not Vote.objects.filter(patch=patch, is_active=True, role__in=EXPERTS).exists():
            return Response({"detail": "Only a patch with an expert label can be gold; label it first."}, status=409)
        patch.is_gold = gold
        patch.save(update_fields=["is_gold"])
        students.reference_changed(project.pk)  # the learning curves' gold answers follow the gold set
        students.refresh_students(project)  # every student's gold counts, and who is certified, follow the gold set
        return Response(PatchSerializer(patch).data)


class ProjectStatsView(ProjectScoped):
    """The caller's own counts (live) and the project's (cached for a few seconds; see annotations.stats)."""

    write_roles = None

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, project_id: int) -> Response:
        project, role = self.load(request, project_id)
        today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
        mine = Vote.objects.filter(project=project, annotator=request.user, is_active=True)
        body: dict[str, Any] = {
            "role": role,
            "queue": stats.queue_counts(project),
            "my_votes_today": mine.filter(created_at__gte=today).count(),
            "my_votes_total": mine.count(),
        }
        if role != Role.CROWD:
            body.update(stats.label_counts(project))
        return Response(body)
