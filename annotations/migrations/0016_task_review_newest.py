# The index is built CONCURRENTLY: the build reads the whole table (0.2 s at a million tasks on 2 idle cores),
# and a plain CREATE INDEX would hold leasing and voting while it does.

import django.db.models
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("annotations", "0015_students_gold_and_certification"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="annotationtask",
            index=django.db.models.Index(
                condition=django.db.models.Q(("kind__in", ["expert", "gold"])),
                fields=["project", "-id"],
                name="task_review_newest",
            ),
        ),
    ]
