"""The agreement report of a project: how far annotators agree, and how reliable each one is."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from django.contrib.auth import get_user_model

from .consensus import gold_labels, label_names, vote_records
from .domain.agreement import annotator_reliability, project_agreement
from .models import Project, Role, Vote


def agreement_report(project: Project) -> dict[str, Any]:
    """Fleiss' kappa / Krippendorff's alpha (statsmodels, krippendorff) and per-annotator reliability
    (scikit-learn Cohen's kappa, crowd-kit Dawid-Skene confusion)."""
    records = vote_records(project)
    labels = label_names(project)
    if not records:
        return {"overall": None, "per_class": {}, "annotators": [], "labels": labels}
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
    }
