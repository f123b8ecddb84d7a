from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.core.reconcile import LocalView, Policy, Step, Target, is_noop, plan

V1 = "sha256:" + "1" * 64
V2 = "sha256:" + "2" * 64
V3 = "sha256:" + "3" * 64
B1, B2, B3 = ("sha256:" + c * 64 for c in "abc")
TARGETS = {
    V1: Target(V1, ((B1, 10),), "m@v1"),
    V2: Target(V2, ((B1, 10), (B2, 20)), "m@v2"),
    V3: Target(V3, ((B3, 30),), "m@v3"),
}
ORDER = ["verify", "download", "stage", "probe", "activate"]


def apply(step: Step, view: LocalView, ok: bool = True) -> LocalView:
    """What the agent's executor does to its local state, in the model of the tests."""
    digest = step.digest
    if step.kind == "noop" or digest is None:
        return view
    if step.kind == "verify":
        return replace(view, verified=view.verified | {digest}) if ok else view
    if step.kind == "download":
        return replace(view, cached=view.cached | set(step.blobs)) if ok else view
    if step.kind == "stage":
        return replace(view, staged=view.staged | {digest}) if ok else view
    if step.kind == "probe":
        if ok:
            return replace(view, probed=view.probed | {digest})
        return replace(view, failed={**view.failed, digest: "probe failed"})
    if step.kind == "activate":
        return replace(
            view,
            active=digest,
            previous=view.active,
            committed=False,
            probation_over=False,
            active_crashed=False,
            health_failures=0,
        )
    if step.kind == "commit":
        return replace(view, committed=True)
    assert step.kind == "rollback"
    failed = {**view.failed, digest: step.reason} if step.mark_failed else view.failed
    return replace(
        view,
        active=view.previous,
        previous=None,
        committed=True,
        active_crashed=False,
        health_failures=0,
        failed=failed,
    )


def crash(view: LocalView) -> LocalView:
    """The agent died while serving its active version; the restart counts it."""
    if view.active is None or view.committed:
        return view
    counts = {**view.crash_counts, view.active: view.crash_counts.get(view.active, 0) + 1}
    return replace(view, crash_counts=counts, active_crashed=True)


def converge(target: Target | None, view: LocalView, limit: int = 20) -> tuple[LocalView, list[Step]]:
    done: list[Step] = []
    for _ in range(limit):
        steps = plan(target, view)
        if is_noop(steps):
            if view.active is not None and not view.committed and not view.probation_over:
                view = replace(view, probation_over=True)
                continue
            return view, done
        view = apply(steps[0], view)
        done.append(steps[0])
    raise AssertionError(f"no convergence after {limit} steps: {done}")


digests = st.sampled_from([V1, V2, V3])
views = st.builds(
    LocalView,
    active=st.none() | digests,
    previous=st.none() | digests,
    committed=st.booleans(),
    verified=st.frozensets(digests),
    cached=st.frozensets(st.sampled_from([B1, B2, B3])),
    staged=st.frozensets(digests),
    probed=st.frozensets(digests),
    failed=st.dictionaries(digests, st.just("earlier failure"), max_size=2),
    crash_counts=st.dictionaries(digests, st.integers(0, 3), max_size=3),
    active_crashed=st.booleans(),
    health_failures=st.integers(0, 4),
    probation_over=st.booleans(),
).filter(lambda v: v.previous is None or v.previous != v.active)
targets = st.none() | st.sampled_from(list(TARGETS.values()))


def test_a_fresh_device_goes_through_every_step_in_order() -> None:
    steps = plan(TARGETS[V2], LocalView())

    assert [s.kind for s in steps] == ORDER
    assert steps[1].blobs == (B1, B2)
    assert all(s.digest == V2 for s in steps)


def test_cached_blobs_are_never_downloaded_again() -> None:
    steps = plan(TARGETS[V2], LocalView(active=V1, verified=frozenset({V2}), cached=frozenset({B1})))

    assert [s.kind for s in steps] == ["download", "stage", "probe", "activate"]
    assert steps[0].blobs == (B2,)


def test_probation_then_commit() -> None:
    on_probation = LocalView(active=V1, committed=False)

    assert [s.kind for s in plan(TARGETS[V1], on_probation)] == ["noop"]
    assert [s.kind for s in plan(TARGETS[V1], replace(on_probation, probation_over=True))] == ["commit"]


def test_a_crash_during_probation_rolls_back_and_the_second_marks_the_version_failed() -> None:
    view = LocalView(active=V1, committed=True)
    for step in plan(TARGETS[V2], view):
        view = apply(step, view)
    assert view.active == V2 and view.previous == V1

    first = plan(TARGETS[V2], crash(view))
    assert [(s.kind, s.mark_failed) for s in first] == [("rollback", False)]
    view = apply(first[0], crash(view))
    assert view.active == V1

    retry = plan(TARGETS[V2], view)
    assert [s.kind for s in retry] == ["activate"]
    view = apply(retry[0], view)
    second = plan(TARGETS[V2], crash(view))
    assert [(s.kind, s.mark_failed) for s in second] == [("rollback", True)]
    assert "2 of 2" in second[0].reason
    view = apply(second[0], crash(view))

    assert view.active == V1 and V2 in view.failed
    assert [s.kind for s in plan(TARGETS[V2], view)] == ["noop"]
    assert plan(TARGETS[V3], view)[0].kind == "verify"  # a new desired version is tried


def test_repeated_health_failures_roll_back_and_mark_failed() -> None:
    view = LocalView(active=V2, previous=V1, committed=True, health_failures=Policy().max_health_failures)

    steps = plan(TARGETS[V2], view)

    assert [(s.kind, s.digest, s.mark_failed) for s in steps] == [("rollback", V2, True)]
    assert [s.kind for s in plan(TARGETS[V2], replace(view, health_failures=1))] == ["noop"]


def test_no_desired_model_keeps_serving() -> None:
    assert [s.kind for s in plan(None, LocalView(active=V1))] == ["noop"]


@settings(max_examples=150, deadline=None)
@given(view=views, target=targets)
def test_never_activates_an_unverified_unprobed_or_failed_version(view: LocalView, target: Target | None) -> None:
    steps = plan(target, view)

    kinds = [s.kind for s in steps]
    assert kinds, "a plan is never empty"
    assert kinds.count("noop") in (0, len(kinds))
    for index, step in enumerate(steps):
        if step.kind != "activate":
            continue
        assert step.digest is not None and step.digest not in view.failed
        earlier = {s.kind for s in steps[:index] if s.digest == step.digest}
        assert step.digest in view.verified or "verify" in earlier
        assert step.digest in view.probed or "probe" in earlier
        assert step.digest in view.staged or "stage" in earlier
        assert step.digest in view.staged or {b for b, _ in TARGETS[step.digest].blobs} <= (
            view.cached | {b for s in steps[:index] for b in s.blobs}
        )
    forward = [k for k in kinds if k in ORDER]
    assert forward == sorted(forward, key=ORDER.index)


@settings(max_examples=150, deadline=None)
@given(view=views, target=targets)
def test_plans_converge_and_a_finished_plan_is_idempotent(view: LocalView, target: Target | None) -> None:
    final, done = converge(target, view)

    assert is_noop(plan(target, final))
    assert plan(target, final) == plan(target, final)
    if target is not None and target.digest not in final.failed:
        assert final.active == target.digest and final.committed
    assert len(done) <= 8


@settings(max_examples=150, deadline=None)
@given(
    view=views,
    target=st.sampled_from(list(TARGETS.values())),
    events=st.lists(st.sampled_from(["ok", "fail", "crash"]), max_size=30),
)
def test_under_failures_and_crashes_only_verified_probed_versions_become_active(
    view: LocalView, target: Target, events: list[str]
) -> None:
    view = replace(view, active_crashed=False, health_failures=0)
    allowed = {view.active, view.previous, None}
    crashes_seen: dict[str, int] = {}
    for event in events:
        if event == "crash":
            if view.active is not None and not view.committed:
                crashes_seen[view.active] = crashes_seen.get(view.active, 0) + 1
            view = crash(view)
        steps = plan(target, view)
        step = steps[0]
        if step.kind == "activate":
            assert step.digest in view.verified and step.digest in view.probed and step.digest in view.staged
            assert step.digest not in view.failed
            allowed.add(step.digest)
        view = apply(step, view, ok=event != "fail")
        assert view.active in allowed
        if event == "crash" and step.kind == "rollback":
            assert view.active != step.digest
    for digest in crashes_seen:  # every crash is followed by its rollback; the last allowed one marks it failed
        if view.crash_counts.get(digest, 0) >= Policy().max_crashes:
            assert digest in view.failed and view.active != digest
    if target.digest in view.failed:
        assert all(s.kind == "noop" for s in plan(target, replace(view, active_crashed=False, health_failures=0)))
