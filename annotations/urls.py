from django.urls import path

from . import api, api_bulk, api_reports

urlpatterns = [
    path("projects/", api.ProjectListView.as_view(), name="project-list"),
    path("projects/<int:project_id>/", api.ProjectDetailView.as_view(), name="project-detail"),
    path("projects/<int:project_id>/labels/", api.LabelListView.as_view(), name="label-list"),
    path("projects/<int:project_id>/labels/<int:label_id>/", api.LabelDetailView.as_view(), name="label-detail"),
    path("projects/<int:project_id>/members/", api.MemberListView.as_view(), name="member-list"),
    path("projects/<int:project_id>/members/<int:member_id>/", api.MemberDetailView.as_view(), name="member-detail"),
    path("projects/<int:project_id>/next-task/", api.NextTaskView.as_view(), name="next-task"),
    path("projects/<int:project_id>/tasks/", api.TaskListView.as_view(), name="task-list"),
    path("projects/<int:project_id>/tasks/<int:task_id>/skip/", api.SkipTaskView.as_view(), name="task-skip"),
    path("projects/<int:project_id>/votes/", api.VoteListView.as_view(), name="vote-list"),
    path("projects/<int:project_id>/votes/bulk/", api_bulk.BulkVoteView.as_view(), name="vote-bulk"),
    path(
        "projects/<int:project_id>/votes/bulk/<int:batch_id>/undo/",
        api_bulk.BulkUndoView.as_view(),
        name="vote-bulk-undo",
    ),
    path("projects/<int:project_id>/votes/undo/", api.UndoVoteView.as_view(), name="vote-undo"),
    path("projects/<int:project_id>/votes/<int:vote_id>/correct/", api.VoteCorrectView.as_view(), name="vote-correct"),
    path("projects/<int:project_id>/patches/<int:patch_id>/", api.PatchDetailView.as_view(), name="patch-detail"),
    path("projects/<int:project_id>/patches/<int:patch_id>/gold/", api.PatchGoldView.as_view(), name="patch-gold"),
    path("projects/<int:project_id>/stats/", api.ProjectStatsView.as_view(), name="project-stats"),
    path("projects/<int:project_id>/overlay/", api_reports.OverlayView.as_view(), name="overlay"),
    path("projects/<int:project_id>/agreement/", api_reports.AgreementView.as_view(), name="agreement"),
    path("projects/<int:project_id>/students/", api_reports.StudentsView.as_view(), name="students"),
    path(
        "projects/<int:project_id>/students/<int:user_id>/learning-curve/",
        api_reports.StudentCurveView.as_view(),
        name="student-learning-curve",
    ),
    path("projects/<int:project_id>/my-progress/", api_reports.MyProgressView.as_view(), name="my-progress"),
    path(
        "projects/<int:project_id>/labelling-speed/", api_reports.LabellingSpeedView.as_view(), name="labelling-speed"
    ),
    path(
        "projects/<int:project_id>/consensus/recompute/",
        api_reports.RecomputeConsensusView.as_view(),
        name="consensus-recompute",
    ),
    path("projects/<int:project_id>/export/", api_reports.ExportView.as_view(), name="export"),
    path("projects/<int:project_id>/training-set/", api_reports.TrainingSetView.as_view(), name="training-set"),
    path("projects/<int:project_id>/regions/", api_reports.ImportRegionsView.as_view(), name="import-regions"),
    path("projects/<int:project_id>/import/", api_reports.ImportLabelsView.as_view(), name="import-labels"),
]
