"""The lean queue route's strict vote input (annotations.lean_queue.vote_input) never disagrees with DRF."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from annotations.lean_queue import vote_input
from annotations.serializers import MAX_ID, VoteInputSerializer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=110),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
vote_like = st.fixed_dictionaries(
    {"patch": json_values | st.integers(-2, MAX_ID + 2), "label": json_values | st.sampled_from(["benign", "7"])},
    optional={
        "task": json_values | st.integers(0, MAX_ID + 1),
        "time_spent_ms": json_values | st.integers(-1, MAX_ID + 1),
        "next": json_values,
        "ahead": json_values,
        "extra": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(body=vote_like | json_values)
def test_the_strict_vote_input_agrees_with_the_serializer(body: Any) -> None:
    """Whatever vote_input accepts, VoteInputSerializer accepts with the same validated data."""
    accepted = vote_input(json.dumps(body).encode())
    if accepted is None:
        return  # left to the serializer (and its 400 or its answer) through Django
    serializer = VoteInputSerializer(data=body)
    assert serializer.is_valid(), (body, serializer.errors)
    assert dict(serializer.validated_data) == accepted


def test_the_annotator_pages_vote_is_taken() -> None:
    """The ordinary body is in the subset (else the lean route would never serve a vote)."""
    body = {"patch": 12, "task": 40, "label": "benign", "time_spent_ms": 1200, "next": False, "ahead": True}
    assert vote_input(json.dumps(body).encode()) == body
    assert vote_input(b'{"patch": 1, "label": 3}') == {
        "patch": 1,
        "label": "3",
        "time_spent_ms": 0,
        "next": False,
        "ahead": False,
    }
    for refused in (
        b'{"patch": true, "label": "a"}',
        json.dumps({"patch": 1, "label": "a\x00"}).encode(),
        b"[1]",
        b"\xff",
    ):
        assert vote_input(refused) is None, refused
