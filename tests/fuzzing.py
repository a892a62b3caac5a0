"""Property-based fuzzing of the REST API against a live server, shared by the suite's fuzz test
(tests/integration/test_fuzz_api.py) and the larger run (tests/bench/fuzz_api.py).

Schemathesis generates requests from the OpenAPI schema the server publishes (/api/v1/schema/),
as one role at a time, authenticated with that user's DRF token, in a project seeded with slides,
patches, labels, tasks, votes and a round (``seed_project``; each role gets its own project, so an
admin deleting labels or members cannot starve the other roles' runs). Generated path ids are
mostly swapped for ids that exist in that project, and some body and query values for existing
ids and a small dictionary of awkward strings, so requests reach past the 404s into the code.

Besides the generated requests, a dictionary pass takes one valid request per operation and
sends it again with each string field set to each of a few awkward values in turn, and with JSON
bodies of the wrong shape: deterministic, so a handful of examples per operation still reach the
parsing mistakes random text almost never hits.

Each response is checked for a 5xx and for conformance to the schema (status code, content
type, headers, body). Every failure is recorded rather than raised, so one run lists all the
distinct failures (one line each, with the smallest request that showed it) instead of stopping
at the first. Hypothesis is seeded, its example database is off and Schemathesis's feedback
(learning from earlier answers) is off, so the same test selection sends the same requests to
the same rows: the report prints a digest of every request sent to show it. A process with a
different history (other tests run before in it) draws other requests from the same seed; the
cause lies inside the generators (observed, not pinned down), so compare digests within one
way of running.
"""

from __future__ import annotations

import copy
import hashlib
import html
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import requests
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.generation.feedback import FeedbackSources

ROLES = ("crowd", "expert", "admin")
SEED = 20261201

# A fuzzing dictionary: strings that parse as something other than they look (Unicode digits,
# infinities, overflowing exponents), empty and control characters. Mixed into generated string
# values now and then, because random text almost never hits them.
AWKWARD_STRINGS = ["²", "٣", "inf", "-inf", "nan", "1e400", "-1", "0", "", " ", "\x00", "true", "[1]", "null"]

# JSON bodies of the wrong shape: an object is expected everywhere, and parsers hand these on.
AWKWARD_BODIES: list[Any] = [[1], [], "s", 1, None, {"properties": "s"}]

# Values of these body and query fields are ids (or names) in the seeded project.
ID_FIELDS = ("patch", "task", "label", "slide", "username", "vote", "round")


@dataclass
class Target:
    """One role's view of a seeded project: its token and the ids that exist there."""

    role: str
    token: str
    path_ids: dict[str, list[Any]]  # path parameter name -> ids in this project
    field_values: dict[str, list[Any]]  # body/query field name -> existing ids or names
    # Gives the user back their role: an admin's fuzzed requests may demote or remove themselves,
    # and every later operation would then be tried as a crowd member or an outsider.
    restore: Callable[[], None] = lambda: None


@dataclass
class Finding:
    """A distinct failure: one per (operation, kind of failure, detail)."""

    operation: str
    kind: str  # "server error", "undocumented status", "body violates schema", ...
    detail: str
    status: int | None
    request: str  # the smallest request that showed it, as a curl command
    note: str = ""  # what that request got, where the detail leaves it out (an exception's message)
    count: int = 1

    def line(self) -> str:
        status = f"HTTP {self.status}" if self.status is not None else "no response"
        note = f" ({self.note})" if self.note else ""
        return f"{self.operation}: {self.kind} ({status}): {self.detail}{note}\n    {self.request}"


@dataclass
class RoleReport:
    role: str
    requests: int = 0
    server_errors: int = 0  # responses, not distinct findings
    schema_mismatches: int = 0  # responses failing any conformance check
    operations: set[str] = field(default_factory=set)  # operations that got at least one request
    not_generated: dict[str, str] = field(default_factory=dict)  # operation -> why no request was made
    findings: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    seconds: float = 0.0
    # A digest of every request sent (method, path, query, body, in order): equal digests, equal runs.
    digest: Any = field(default_factory=hashlib.sha256)

    def record(self, finding: Finding) -> None:
        key = (finding.operation, finding.kind, finding.detail)
        known = self.findings.get(key)
        if known is None:
            self.findings[key] = finding
            return
        known.count += 1
        if len(finding.request) < len(known.request):
            known.request, known.note = finding.request, finding.note

    def problems(self) -> list[str]:
        """Everything that makes the fuzz test fail, one readable entry each, worst kinds first."""
        ordered = sorted(self.findings.values(), key=lambda f: (_rank(f.kind), f.operation, f.detail))
        lines = [f.line() for f in ordered]
        lines += [f"{op}: no request could be generated: {why}" for op, why in sorted(self.not_generated.items())]
        return lines


# Crashes first, then bodies and content types that break clients, then status codes the schema omits.
_KIND_ORDER = ["server error", "no response", "body violates schema", "content type"]


def _rank(kind: str) -> int:
    return _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER) + (kind == "undocumented status")


# --- seeding ---


def seed_project(role: str, slide_path: Any) -> Target:
    """A project with a real slide and its patches, the three label classes, a queue, votes by
    two crowd members and an expert (so consensus, agreement and exports have data), a gold
    patch and a finished round; plus the member of ``role`` whose token the fuzzer uses.

    Needs committed rows (the server runs in another process): call it outside a transaction.
    """
    from rest_framework.authtoken.models import Token

    from annotations.consensus import recompute_consensus
    from annotations.models import AnnotationTask, Membership, Patch, Role, Vote
    from annotations.slides import ingest as slides
    from learner.models import TrainingRound
    from tests.factories import ProjectFactory, member, queue_every_patch

    project = ProjectFactory(name=f"fuzz {role}", gold_rate=0.2)
    slide = slides.ingest(slides.add_slide_from_path(project, slide_path, launch=False).pk)
    assert slide is not None and slide.status == "ready", slide and slide.error
    queue_every_patch(project)
    user = member(project, role, username=f"fuzz-{role}-{project.pk}")
    crowd = [member(project, Role.CROWD, username=f"fuzz-voter{i}-{project.pk}") for i in range(2)]
    expert = member(project, Role.EXPERT, username=f"fuzz-reviewer-{project.pk}")
    labels = list(project.label_classes.order_by("order"))
    patches = list(Patch.objects.filter(project=project).order_by("id")[:6])
    assert len(patches) >= 4, "the fuzz slide must give at least four patches"
    for i, patch in enumerate(patches[:4]):
        for annotator, who in ((crowd[0], Role.CROWD), (crowd[1], Role.CROWD), (expert, Role.EXPERT)):
            label = labels[(i + (annotator.pk % 2)) % len(labels)]
            Vote.objects.create(project=project, patch=patch, annotator=annotator, label=label, role=who)
        recompute_consensus(project, patch)
    patches[0].is_gold = True
    patches[0].save(update_fields=["is_gold"])
    TrainingRound.objects.create(project=project, number=1, state=TrainingRound.State.SUCCEEDED)
    token, _ = Token.objects.get_or_create(user=user)

    def ids(rows: Any, limit: int = 8) -> list[int]:
        # Ordered, so the same draws pick the same rows in every run.
        return list(rows.filter(project=project).order_by("pk").values_list("pk", flat=True)[:limit])

    path_ids = {
        "project_id": [project.pk],
        "label_id": [label.pk for label in labels],
        "member_id": ids(Membership.objects.exclude(user=user)),
        "patch_id": [p.pk for p in patches],
        "task_id": ids(AnnotationTask.objects),
        "vote_id": ids(Vote.objects),
        "round_id": ids(TrainingRound.objects),
        "slide_id": [slide.pk],
    }
    field_values = {
        "patch": path_ids["patch_id"],
        "task": path_ids["task_id"],
        "label": [label.pk for label in labels] + [label.name for label in labels] + [str(labels[0].pk)],
        "slide": [slide.pk, str(slide.pk)],
        "username": [u.username for u in (*crowd, expert)] + ["nobody-here"],
        "vote": path_ids["vote_id"],
        "round": path_ids["round_id"],
    }

    def restore() -> None:
        Membership.objects.update_or_create(user=user, project=project, defaults={"role": role})

    return Target(role=role, token=token.key, path_ids=path_ids, field_values=field_values, restore=restore)


# --- fuzzing ---


def load_schema(base_url: str) -> Any:
    import schemathesis

    return schemathesis.openapi.from_url(f"{base_url}/api/v1/schema/")


def fuzz_role(
    schema: Any,
    base_url: str,
    target: Target,
    *,
    examples: int,
    seed_value: int = SEED,
) -> RoleReport:
    """Sends up to ``examples`` positive and as many negative requests per operation as
    ``target``, and the operation's dictionary pass."""
    report = RoleReport(role=target.role)
    started = time.monotonic()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = operation.label
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_operation(operation, mode, base_url, session, target, report, examples, seed_value)
            except Unsatisfiable as exc:
                # Some operations have nothing a negative request could get wrong (no parameters).
                if mode == GenerationMode.POSITIVE:
                    report.not_generated[label] = str(exc)
    report.seconds = time.monotonic() - started
    return report


def _fuzz_operation(
    operation: Any,
    mode: Any,
    base_url: str,
    session: requests.Session,
    target: Target,
    report: RoleReport,
    examples: int,
    seed_value: int,
) -> None:
    templates: list[Any] = []  # the first positive request, for the dictionary pass
    # No feedback: Schemathesis would otherwise learn from earlier answers and the requests of a
    # run would depend on what ran before it.
    strategy = operation.as_strategy(generation_mode=mode, feedback=FeedbackSources())

    @seed(seed_value)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=strategy, data=st.data())
    def send(case: Any, data: st.DataObject) -> None:
        steer(case, data, target)
        if mode == GenerationMode.POSITIVE and not templates:
            templates.append(case)
        exchange(case, base_url, session, target, report)

    send()
    for case in awkward_variants(operation, templates[0], target) if templates else []:
        exchange(case, base_url, session, target, report)


def awkward_variants(operation: Any, template: Any, target: Target) -> list[Any]:
    """The dictionary pass: ``template`` pointed at existing rows, then each string field (and
    each id field) of its query and body set to each awkward string in turn, and, for a JSON
    body, the body replaced by each wrong shape."""
    path = {
        name: target.path_ids[name][0] if name in target.path_ids else value
        for name, value in (template.path_parameters or {}).items()
    }
    base = {}
    for location in ("query", "body"):
        container = copy.deepcopy(getattr(template, location))
        if isinstance(container, dict):
            for key in container:
                if key in target.field_values:
                    container[key] = target.field_values[key][0]
        base[location] = container
    changes: list[tuple[str, Any]] = []
    for location, container in base.items():
        if not isinstance(container, dict):
            continue
        for key, value in container.items():
            if isinstance(value, str) or key in target.field_values:
                changes += [(location, {**container, key: awkward}) for awkward in AWKWARD_STRINGS]
    variants = []
    has_body = bool(list(operation.body))
    for location, value in changes:
        fields = {**base, location: value}
        # An operation without a request body gets none (Schemathesis cannot pick a media type for it).
        body = {"body": fields["body"], "media_type": template.media_type} if has_body else {}
        variants.append(operation.Case(path_parameters=dict(path), query=fields["query"], **body))
    # Whatever media type the template happened to use, the wrong shapes go as JSON where it is accepted.
    json_types = [body.media_type for body in operation.body if "json" in body.media_type]
    for shape in AWKWARD_BODIES if json_types else []:
        variants.append(
            operation.Case(
                path_parameters=dict(path), query=base["query"], body=copy.deepcopy(shape), media_type=json_types[0]
            )
        )
    return variants


def steer(case: Any, data: st.DataObject, target: Target) -> None:
    """Points most generated path ids at rows that exist, and some body and query values at
    existing ids or awkward strings; the rest stays as Schemathesis generated it."""
    for name in list(case.path_parameters or {}):
        if name in target.path_ids and data.draw(st.integers(0, 7), label=f"keep {name}") != 0:
            case.path_parameters[name] = data.draw(st.sampled_from(target.path_ids[name]), label=name)
    for container in (case.query, case.body):
        if not isinstance(container, dict):
            continue
        for key, value in list(container.items()):
            if key in target.field_values and data.draw(st.booleans(), label=f"existing {key}"):
                container[key] = data.draw(st.sampled_from(target.field_values[key]), label=key)
            elif isinstance(value, str) and data.draw(st.integers(0, 4), label=f"awkward {key}") == 0:
                container[key] = data.draw(st.sampled_from(AWKWARD_STRINGS), label=key)


def _checks() -> list[Any]:
    from schemathesis import checks

    return [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_headers_conformance,
        checks.response_schema_conformance,
    ]


def exchange(case: Any, base_url: str, session: requests.Session, target: Target, report: RoleReport) -> None:
    """Sends one case, validates the answer and records what failed."""
    from schemathesis.core.failures import FailureGroup

    headers = {"Authorization": f"Token {target.token}"}
    label = case.operation.label
    report.operations.add(label)
    report.requests += 1
    body = case.body if isinstance(case.body, dict | list | str | int | float | bool | None) else "-"
    report.digest.update(repr((case.method, case.formatted_path, case.query, body, case.media_type)).encode())
    try:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
    except requests.RequestException as exc:
        report.record(Finding(label, "no response", type(exc).__name__, None, reproduction(case, base_url, target)))
        return
    finally:
        if "/members/" in case.path:
            target.restore()
    if response.status_code >= 500:
        report.server_errors += 1
    try:
        case.validate_response(response, checks=_checks(), headers=headers)
    except FailureGroup as group:
        failures = list(group.exceptions)
    else:
        return
    if any(type(f).__name__ != "ServerError" for f in failures):
        report.schema_mismatches += 1
    request = reproduction(case, base_url, target)
    for failure in failures:
        kind, detail, note = describe(failure, response)
        report.record(Finding(label, kind, detail, response.status_code, request, note))


def reproduction(case: Any, base_url: str, target: Target) -> str:
    # Schemathesis prints the Authorization header as [Filtered]: the token is the role's.
    return case.as_curl_command(headers={"Authorization": f"Token {target.token}"}, base_url=base_url)


def describe(failure: Any, response: Any) -> tuple[str, str, str]:
    """A short kind, the detail that tells this failure from others of its kind, and a note on
    this one occurrence."""
    name = type(failure).__name__
    if name == "ServerError":
        exception, message = server_exception(response.text)
        return "server error", exception, message
    if name == "UndefinedStatusCode":
        documented = ", ".join(failure.defined_status_codes)
        return "undocumented status", f"{failure.status_code} (documented: {documented})", ""
    if name == "JsonSchemaError":
        where = "/".join(str(p) for p in failure.instance_path) or "the root"
        return "body violates schema", f"at {where}: {_one_line(failure.validation_message)}", ""
    if name in ("UndefinedContentType", "MissingContentType", "MalformedMediaType", "ContentDeserializationError"):
        return "content type", f"{failure.title}: {_one_line(failure.message)}", ""
    return failure.title.lower(), _one_line(failure.message), ""


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_HTML_TITLE = re.compile(r"<title>(.*?)</title>", re.S)
_HTML_VALUE = re.compile(r'<pre class="exception_value">(.*?)</pre>', re.S)
_HTML_FRAME = re.compile(r'<code class="fname">(.*?)</code>, line (\d+), in (\S+?)</', re.S)
_TEXT_FRAME = re.compile(r'File "(.*?)", line (\d+), in (\S+)')


def server_exception(body: str) -> tuple[str, str]:
    """The exception behind a 500, read from Django's debug page (HTML or plain text): its type
    with the last frame in the project's own code (one bug, however its message varies), and
    its message."""
    frames = _HTML_FRAME.findall(body) or _TEXT_FRAME.findall(body)
    title = _HTML_TITLE.search(body)
    if title:
        kind = html.unescape(title.group(1)).split(" at ", 1)[0].strip()
        value = _HTML_VALUE.search(body)
        message = html.unescape(value.group(1)).strip() if value else ""
    elif body.strip():
        first, _, rest = body.strip().partition("\n")
        kind = first.split(" at ", 1)[0].strip()
        message = rest.strip().partition("\n")[0]
    else:
        return "an empty body (run the server with DEBUG=1 to see the exception)", ""
    own = [f for f in frames if "site-packages" not in f[0] and "/lib/python" not in f[0]]
    where = ""
    if own:
        path, line, function = own[-1]
        where = f" in {_repo_relative(html.unescape(path))}:{line} ({html.unescape(function)})"
    return f"{kind}{where}", _one_line(message, 160)


def _repo_relative(path: str) -> str:
    for marker in ("/annotations/", "/learner/", "/histoloop/", "/frontend/"):
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return path


# --- reporting ---


def summary_table(reports: Iterable[RoleReport], total_operations: int) -> str:
    rows = [
        f"{'role':<8} {'requests':>9} {'operations':>11} {'5xx':>6} {'mismatches':>11} {'distinct':>9} {'seconds':>8}"
    ]
    for r in reports:
        rows.append(
            f"{r.role:<8} {r.requests:>9} {len(r.operations):>5}/{total_operations:<5} {r.server_errors:>6} "
            f"{r.schema_mismatches:>11} {len(r.findings):>9} {r.seconds:>8.1f}"
        )
    return "\n".join(rows)


def failure_report(report: RoleReport) -> str:
    problems = report.problems()
    head = (
        f"The API fuzzer found {len(problems)} distinct problem(s) as {report.role} "
        f"({report.requests} requests, {report.server_errors} answered 5xx, "
        f"{report.schema_mismatches} did not match the schema; requests digest {report.digest.hexdigest()[:12]}):"
    )
    return "\n".join([head, *(f"- {p}" for p in problems)])
