"""The lean queue route (annotations.lean_queue) answers next-task and vote as Django does, and takes only those.

Driven as the ASGI server drives it, in front of the one-hop Django handler, and compared request by
request with the same handler alone (Django's middleware and DRF): the status, the body and the
headers. A counting wrapper around Django tells which of the two answered.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from annotations.lean_queue import LeanQueue
from annotations.models import AnnotationTask, Consensus, LabelClass, Role, Vote
from annotations.serializers import MAX_ID
from histoloop.asgi_handler import OneHopASGIHandler
from tests.factories import ProjectFactory, member
from tests.integration import test_asgi_handler
from tests.integration.test_asgi_handler import call, comparable, session_headers, token_headers

pytestmark = pytest.mark.django_db(transaction=True)

world = test_asgi_handler.world  # the same project (a fixture) as the handler's parity tests


class Counting:
    """Django behind the lean route, counting the requests that reach it."""

    def __init__(self, app: Any) -> None:
        self.app, self.calls = app, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await self.app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:  # run_in_thread: the handler's threads
        return getattr(self.app, name)


@pytest.fixture
def routes():  # type: ignore[no-untyped-def]
    django = OneHopASGIHandler()
    counted = Counting(django)
    return django, counted, LeanQueue(counted, threads=counted)


def served_lean(counted: Counting, app: Any, *args: Any) -> dict[str, Any]:
    before = counted.calls
    response = call(app, *args)
    assert counted.calls == before, f"Django answered {args[:2]}, not the lean route: {response}"
    return response


def handed_over(counted: Counting, app: Any, *args: Any) -> dict[str, Any]:
    before = counted.calls
    response = call(app, *args)
    assert counted.calls == before + 1, f"the lean route answered {args[:2]} itself: {response}"
    return response


def test_next_task_and_vote_answer_as_django_does(world, routes) -> None:  # type: ignore[no-untyped-def]
    django, counted, lean = routes
    base = f"/api/v1/projects/{world.pk}"
    user = member(world, Role.CROWD)
    auth = token_headers(user)
    first = handed_over(counted, lean, "POST", f"{base}/next-task/", auth)  # the credential is not known yet
    assert first["status"] == 200
    # Known now: the held lease comes back from both routes, byte for byte, with the same headers.
    again_lean = served_lean(counted, lean, "POST", f"{base}/next-task/", auth)
    again_django = call(django, "POST", f"{base}/next-task/", auth)
    assert comparable(again_lean) == comparable(again_django)
    assert again_lean["body"] == again_django["body"] == first["body"]
    task = json.loads(first["body"])

    # A vote, then the same vote again (the queue's 409), each compared with a second user's through Django.
    body = json.dumps({"patch": task["patch"]["id"], "task": task["id"], "label": "benign", "time_spent_ms": 900})
    voted = served_lean(counted, lean, "POST", f"{base}/votes/", auth, body.encode())
    assert voted["status"] == 201, voted
    vote = Vote.objects.get(annotator=user)
    assert (vote.patch_id, vote.task_id, vote.label.name, vote.time_spent_ms) == (
        task["patch"]["id"],
        task["id"],
        "benign",
        900,
    )
    assert json.loads(voted["body"])["vote"]["id"] == vote.pk
    assert AnnotationTask.objects.get(pk=task["id"]).votes_received == 1
    twice = served_lean(counted, lean, "POST", f"{base}/votes/", auth, body.encode())

    other = member(world, Role.CROWD)
    other_auth = token_headers(other)
    other_task = json.loads(call(django, "POST", f"{base}/next-task/", other_auth)["body"])
    other_body = json.dumps(
        {"patch": other_task["patch"]["id"], "task": other_task["id"], "label": "benign", "time_spent_ms": 900}
    )
    voted_django = call(django, "POST", f"{base}/votes/", other_auth, other_body.encode())
    twice_django = call(django, "POST", f"{base}/votes/", other_auth, other_body.encode())
    assert comparable(voted) == comparable(voted_django)
    assert json.loads(voted["body"]).keys() == json.loads(voted_django["body"]).keys() == {"vote"}
    assert comparable(twice) == comparable(twice_django) and twice["status"] == 409
    assert twice["body"] == twice_django["body"]
    assert Vote.objects.filter(annotator=user).count() == 1  # the refused one changed nothing


def test_ahead_next_an_experts_consensus_and_an_empty_queue(world, routes) -> None:  # type: ignore[no-untyped-def]
    django, counted, lean = routes
    base = f"/api/v1/projects/{world.pk}"
    expert = member(world, Role.EXPERT)
    auth = token_headers(expert)
    handed_over(counted, lean, "POST", f"{base}/next-task/", auth)  # fills the credential cache
    with_ahead = served_lean(counted, lean, "POST", f"{base}/next-task/?ahead=1", auth)
    answer = json.loads(with_ahead["body"])
    assert answer["ahead"] is not None and answer["ahead"]["id"] != answer["id"]
    squamous = LabelClass.objects.get(project=world, name="squamous").pk  # by id, as the annotator page sends it
    body = {"patch": answer["patch"]["id"], "task": answer["id"], "label": squamous, "next": True}
    voted = json.loads(served_lean(counted, lean, "POST", f"{base}/votes/", auth, json.dumps(body).encode())["body"])
    stored = Consensus.objects.get(patch_id=answer["patch"]["id"])
    assert voted["consensus"]["vote_count"] == stored.vote_count == 1
    assert voted["consensus"]["label_name"] == stored.label.name
    assert voted["next"]["id"] == answer["ahead"]["id"]  # the lease already held ahead comes next

    # Nothing left for this user: 204 from both routes, the same headers.
    AnnotationTask.objects.filter(project=world).update(state="done")
    empty_lean = served_lean(counted, lean, "POST", f"{base}/next-task/", auth)
    empty_django = call(django, "POST", f"{base}/next-task/", auth)
    assert empty_lean["status"] == empty_django["status"] == 204
    assert comparable(empty_lean) == comparable(empty_django) and empty_lean["body"] == b""


def test_every_refusal_is_djangos_answer(world, routes) -> None:  # type: ignore[no-untyped-def]
    django, counted, lean = routes
    base = f"/api/v1/projects/{world.pk}"
    crowd, outsider = member(world, Role.CROWD), member(ProjectFactory(), Role.CROWD)
    for user in (crowd, outsider):  # both credentials known to the cache
        call(lean, "POST", f"/api/v1/projects/{user.memberships.first().project_id}/next-task/", token_headers(user))
    task = json.loads(call(lean, "POST", f"{base}/next-task/", token_headers(crowd))["body"])
    good = {"patch": task["patch"]["id"], "task": task["id"], "label": "benign"}
    requests = [
        ("POST", f"{base}/next-task/", [], b""),  # anonymous
        ("POST", f"{base}/next-task/", token_headers(outsider), b""),  # someone else's project (cached token)
        ("POST", f"{base}/next-task/", [(b"authorization", b"Token nope")], b""),
        ("POST", f"{base}/next-task/", session_headers(crowd, csrf=False), b""),  # a session, no CSRF token
        ("POST", f"{base}/votes/", token_headers(crowd), b'{"patch": "x", "label": ""}'),
        ("POST", f"{base}/votes/", token_headers(crowd), b"{not json"),
        ("POST", f"{base}/votes/", token_headers(crowd), json.dumps({**good, "next": None}).encode()),
        ("POST", f"{base}/votes/", token_headers(crowd), b'{"patch": 1e400, "label": "benign"}'),
        ("POST", f"{base}/votes/", [token_headers(crowd)[0], (b"content-type", b"text/plain")], b"{}"),
        ("POST", f"{base}/next-task/", [*token_headers(crowd), (b"accept", b"text/html")], b""),
        ("POST", f"/api/v1/projects/{MAX_ID * 10}/next-task/", token_headers(crowd), b""),
        ("POST", "/api/v1/projects/21885013145569764/next-task/", token_headers(crowd), b""),  # found by the fuzzer
        ("POST", "/api/v1/projects/21885013145569764/votes/", token_headers(crowd), json.dumps(good).encode()),
        ("POST", f"{base}/votes/", [*token_headers(crowd)[:1], (b"host", b"evil.example")], json.dumps(good).encode()),
    ]
    for method, path, headers, body in requests:
        a = handed_over(counted, lean, method, path, headers, body)
        b = call(django, method, path, headers, body)
        assert comparable(a) == comparable(b), (path, headers, a, b)
        assert a["status"] >= 400 or (b"accept", b"text/html") in headers, (path, headers, a)  # DEBUG: DRF's HTML
        if "json" in a["headers"].get("content-type", ""):
            assert a["body"] == b["body"], (path, a["body"], b["body"])
    assert Vote.objects.filter(project=world).count() == 0
    # The queue's own refusals (here an unknown label) are the views' code, so the lean route's too.
    unknown = json.dumps({**good, "label": "no-such-label"}).encode()
    a = served_lean(counted, lean, "POST", f"{base}/votes/", token_headers(crowd), unknown)
    b = call(django, "POST", f"{base}/votes/", token_headers(crowd), unknown)
    assert a["status"] == 400 and comparable(a) == comparable(b) and a["body"] == b["body"]
    assert Vote.objects.filter(project=world).count() == 0

    # Bodies the serializer accepts but the strict subset does not: Django's, and the vote is cast.
    unusual = [
        lambda t: {"patch": str(t["patch"]["id"]), "task": t["id"], "label": "benign"},
        lambda t: {"patch": t["patch"]["id"], "task": float(t["id"]), "label": " benign "},
        lambda t: {"patch": t["patch"]["id"], "task": t["id"], "label": "benign", "next": "true", "note": 1},
    ]
    for make in unusual:
        user = member(world, Role.CROWD)
        leased = json.loads(call(lean, "POST", f"{base}/next-task/", token_headers(user))["body"])
        voted = handed_over(
            counted, lean, "POST", f"{base}/votes/", token_headers(user), json.dumps(make(leased)).encode()
        )
        assert voted["status"] == 201, voted
        assert Vote.objects.get(annotator=user).patch_id == leased["patch"]["id"]
    # A session with its CSRF token, once Django has authenticated it, is the lean route's.
    session = session_headers(crowd, csrf=True)
    handed_over(counted, lean, "POST", f"{base}/next-task/", session)
    assert served_lean(counted, lean, "POST", f"{base}/next-task/", session)["status"] == 200


def test_a_middleware_it_does_not_know_turns_it_off(world, settings) -> None:  # type: ignore[no-untyped-def]
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "django.middleware.locale.LocaleMiddleware"]
    counted = Counting(OneHopASGIHandler())
    lean = LeanQueue(counted, threads=counted)
    assert lean.middleware is None
    auth = token_headers(member(world, Role.CROWD))
    for _ in range(2):
        handed_over(counted, lean, "POST", f"/api/v1/projects/{world.pk}/next-task/", auth)


def test_the_served_application_mounts_it_with_the_handlers_threads() -> None:
    from histoloop import asgi

    route = asgi.application.application_mapping["http"].app  # inside the body limits
    assert isinstance(route, LeanQueue) and route.middleware is not None
    assert route.run_in_thread == asgi.django_asgi_app.run_in_thread  # the one-hop handler's threads
