# Built CONCURRENTLY, as 0016: the build reads the whole task table, and a plain CREATE INDEX would hold leasing
# and voting while it does. Every task's model_posterior is null when it runs (0017 added it), so it is small.

import django.db.models
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("annotations", "0017_model_prior"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="annotationtask",
            index=django.db.models.Index(
                condition=django.db.models.Q(("kind", "crowd"), ("model_posterior__isnull", False)),
                fields=["project", "patch", "-id"],
                name="task_model_prior",
            ),
        ),
    ]
