# The index is built CONCURRENTLY: at a million tasks the build reads the table for about a second, and a
# plain CREATE INDEX would hold leasing and voting for that long.

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
