"""Choosing the serving configuration by measurement: candidates and the choice (pure), the child measurement with
the environment it claims, the time budget, persistence, the wait-policy hand-off, and ``slmops serve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.errors import ConfigError, RuntimeBackendError
from slmops.runtime import tuning as tuning_module
from slmops.runtime.tuning import (
    Candidate,
    Measurement,
    TuningConfig,
    TuningStore,
    candidates,
    child_groups,
    choose,
    realizable,
    thread_counts,
    tune,
)

FAST = TuningConfig(budget_s=120.0, prompt_tokens=48, decode_tokens=8, context_tokens=256)


@pytest.fixture(autouse=True)
def _no_user_wait_policy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    yield


# ----------------------------------------------------------------------------------------------- candidates


@given(st.integers(min_value=1, max_value=256))
def test_thread_counts_cover_one_and_all_cores_ascending(cores: int) -> None:
    counts = thread_counts(cores)

    assert counts[0] == 1 and counts[-1] == cores
    assert counts == sorted(set(counts))
    assert all(1 <= t <= cores for t in counts)
    assert len(counts) <= 4 or len(counts) <= 2 * cores.bit_length() + 1
    if cores <= 4:
        assert counts == list(range(1, cores + 1))


@given(
    st.integers(min_value=1, max_value=64),
    st.lists(st.sampled_from([64, 128, 512, 2048]), min_size=1, max_size=3, unique=True),
    st.sampled_from([("passive", "bounded", "active"), ("passive", "active"), ("active",), ("bounded",)]),
)
def test_candidates_compare_threads_and_policies_first_and_share_children_safely(
    cores: int, batches: list[int], policies: tuple[str, ...]
) -> None:
    cands = candidates(cores, batch_sizes=batches, policies=policies)  # type: ignore[arg-type]

    assert len(cands) == len(set(cands))
    assert all((c.threads == 1) == (c.omp_wait_policy is None) for c in cands)
    assert {c.omp_wait_policy for c in cands} - {None} == (set(policies) if cores > 1 else set())
    assert {c.batch_tokens for c in cands} == set(batches)
    first = [c.batch_tokens == batches[0] for c in cands]
    assert first == sorted(first, reverse=True)  # every thread count and policy at the first batch size first
    assert sum(first) == 1 + (len(thread_counts(cores)) - 1) * len(policies)
    assert cands[0] == Candidate(1, None, batches[0])
    groups = child_groups(cands)
    assert [c for _, members in groups for c in members] == cands
    for policy, members in groups:
        assert {m.omp_wait_policy for m in members} <= {None, policy}
        assert [m.threads for m in members] == sorted(m.threads for m in members)  # never fewer threads after more


def test_candidates_for_two_cores() -> None:
    cands = candidates(2)
    assert cands == [
        Candidate(1, None, 512),
        Candidate(2, "passive", 512),
        Candidate(2, "bounded", 512),
        Candidate(2, "active", 512),
        Candidate(1, None, 128),
        Candidate(2, "passive", 128),
        Candidate(2, "bounded", 128),
        Candidate(2, "active", 128),
    ]
    assert child_groups(cands) == [
        ("passive", cands[0:2]),
        ("bounded", cands[2:3]),
        ("active", cands[3:4]),
        ("passive", cands[4:6]),
        ("bounded", cands[6:7]),
        ("active", cands[7:8]),
    ]
    assert candidates(2, policies=("active",)) == [
        Candidate(1, None, 512),
        Candidate(2, "active", 512),
        Candidate(1, None, 128),
        Candidate(2, "active", 128),
    ]


# ----------------------------------------------------------------------------------------------- choose


def _m(threads: int, policy: str | None, batch: int, prefill: float, decode: float) -> Measurement:
    return Measurement(Candidate(threads, policy, batch), prefill, decode)  # type: ignore[arg-type]


measurements = st.lists(
    st.builds(
        _m,
        st.integers(1, 8),
        st.sampled_from([None, "active", "passive", "bounded"]),
        st.sampled_from([128, 512]),
        st.floats(0, 5000),
        st.floats(0.1, 200),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200)
@given(measurements, st.randoms())
def test_choose_picks_a_measured_candidate_within_tolerance_of_the_best_decode(
    found: list[Measurement], rng: object
) -> None:
    chosen = choose(found, model_digest="sha256:x", measured_at=7)
    shuffled = list(found)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]

    best = max(m.decode_tokens_per_s for m in found)
    assert chosen.decode_tokens_per_s >= round(best * 0.97, 3) - 1e-3
    assert any(
        (m.candidate.threads, m.candidate.omp_wait_policy, m.candidate.batch_tokens)
        == (chosen.threads, chosen.omp_wait_policy, chosen.batch_tokens)
        for m in found
    )
    assert chosen.candidates_measured == len(found) and chosen.model_digest == "sha256:x"
    assert choose(shuffled, model_digest="sha256:x", measured_at=7) == chosen  # order does not matter


def test_choose_prefers_prefill_then_fewer_threads_then_passive_among_equals() -> None:
    # the numbers: 1 thread ~75, 2 spinning ~68, 2 passive ~37
    assert (
        choose([_m(1, None, 512, 300, 75), _m(2, "active", 512, 500, 68), _m(2, "passive", 512, 450, 37)]).threads == 1
    )
    # decode within 3%: the higher prefill wins
    within = choose([_m(1, None, 512, 300, 75), _m(2, "active", 512, 500, 74)])
    assert (within.threads, within.omp_wait_policy) == (2, "active")
    # decode and prefill within 3%: fewer threads, then passive, then the larger batch
    assert choose([_m(2, "active", 512, 500, 74), _m(1, None, 512, 495, 75)]).threads == 1
    assert choose([_m(2, "active", 512, 500, 74), _m(2, "passive", 128, 495, 75)]).omp_wait_policy == "passive"
    assert choose([_m(2, "passive", 128, 500, 74), _m(2, "passive", 512, 495, 75)]).batch_tokens == 512
    # the idle cost decides among equals: bounded (spins ~ms, then sleeps) before active (spins for minutes) ...
    assert choose([_m(2, "active", 512, 500, 75), _m(2, "bounded", 512, 495, 74)]).omp_wait_policy == "bounded"
    # ... and passive before bounded; a faster active still wins
    assert choose([_m(2, "bounded", 512, 500, 75), _m(2, "passive", 512, 495, 74)]).omp_wait_policy == "passive"
    assert choose([_m(2, "active", 512, 500, 75), _m(2, "bounded", 512, 495, 60)]).omp_wait_policy == "active"


def test_choose_refuses_when_nothing_decoded() -> None:
    with pytest.raises(RuntimeBackendError, match="no candidate"):
        choose([_m(1, None, 512, 0, 0)])


def test_realizable_serves_the_best_the_loaded_policy_allows() -> None:
    found = [_m(1, None, 512, 300, 60), _m(2, "active", 512, 500, 75), _m(2, "passive", 512, 450, 40)]
    chosen = choose(found, model_digest="d")
    assert chosen.omp_wait_policy == "active"

    assert realizable(chosen, found, "active") == chosen
    served = realizable(chosen, found, "passive")
    assert (served.threads, served.omp_wait_policy, served.decode_tokens_per_s) == (1, None, 60)
    assert served.candidates_measured == 3
    one = choose([_m(1, None, 512, 300, 80)], model_digest="d")
    assert realizable(one, found, "passive") == one  # one thread: the policy does not matter


# ----------------------------------------------------------------------------------------------- measuring


def test_each_child_runs_with_the_wait_policy_and_threads_it_claims(tiny_model: Path) -> None:
    outcome = tune(tiny_model, "sha256:tiny", cores=2, config=FAST)

    assert not outcome.not_measured and not outcome.failures
    assert [m.candidate for m in outcome.measurements] == candidates(2, batch_sizes=FAST.batch_sizes)
    for m in outcome.measurements:
        assert m.child_threads == m.candidate.threads
        assert m.child_wait_policy == (m.candidate.omp_wait_policy or "passive")  # one thread runs in the first child
        assert m.decode_tokens_per_s > 0 and m.prefill_tokens_per_s > 0
    assert outcome.tuning.candidates_measured == 8 and outcome.tuning.model_digest == "sha256:tiny"
    assert outcome.tuning == choose(
        outcome.measurements, model_digest="sha256:tiny", measured_at=outcome.tuning.measured_at
    )


def test_a_wait_policy_the_user_set_is_the_only_one_measured(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")

    outcome = tune(tiny_model, "sha256:tiny", cores=2, config=FAST)

    assert {m.candidate.omp_wait_policy for m in outcome.measurements} == {None, "active"}
    assert {m.child_wait_policy for m in outcome.measurements} == {"active"}


def test_the_budget_stops_after_the_first_candidate(tiny_model: Path) -> None:
    config = TuningConfig(budget_s=1e-9, prompt_tokens=48, decode_tokens=8, context_tokens=256)

    outcome = tune(tiny_model, "sha256:tiny", cores=2, config=config)

    assert [m.candidate for m in outcome.measurements] == [Candidate(1, None, 512)]
    assert outcome.tuning.candidates_measured == 1
    assert list(outcome.not_measured) == candidates(2)[1:]


def test_no_child_starts_after_the_budget(tiny_model: Path) -> None:
    ticks = iter([0.0, 0.0, 1000.0, 1000.0])  # the parent's clock: the first child starts in time, the next does not

    outcome = tune(tiny_model, "sha256:tiny", cores=2, config=FAST, clock=lambda: next(ticks))

    assert [m.candidate for m in outcome.measurements] == candidates(2)[:2]  # the first child's
    assert list(outcome.not_measured) == candidates(2)[2:]


def test_a_model_that_does_not_load_measures_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)

    with pytest.raises(RuntimeBackendError, match="measured none"):
        tune(bad, "sha256:bad", cores=2, config=FAST)


# ----------------------------------------------------------------------------------------------- persistence


def test_the_store_reuses_a_tuning_and_measures_again_when_the_model_or_device_changes(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TuningStore(tmp_path / "agent" / "tuning.json")
    first = tune(tiny_model, "sha256:a", cores=1, config=FAST, store=store, wall_clock=lambda: 100.0)
    assert not first.reused and first.tuning.measured_at == 100
    assert (store.path.stat().st_mode & 0o777) == 0o600

    missing = tmp_path / "gone.gguf"  # reuse must not measure: this model could not be
    again = tune(missing, "sha256:a", cores=1, config=FAST, store=TuningStore(store.path))
    assert again.reused and again.tuning == first.tuning
    assert again.measurements == first.measurements

    other_model = tune(tiny_model, "sha256:b", cores=1, config=FAST, store=store, wall_clock=lambda: 200.0)
    assert not other_model.reused and other_model.tuning.measured_at == 200

    real = tuning_module.device_fingerprint()
    monkeypatch.setattr(tuning_module, "device_fingerprint", lambda: {**real, "llama_cpp_python": "9.9.9"})
    upgraded = tune(tiny_model, "sha256:a", cores=1, config=FAST, store=store, wall_clock=lambda: 300.0)
    assert not upgraded.reused and upgraded.tuning.measured_at == 300
    assert len(json.loads(store.path.read_text())["records"]) == 3


def test_a_corrupt_store_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "tuning.json"
    path.write_text('{"records": {"x": {"tuning": {}}}}')

    with pytest.raises(ConfigError, match="delete it"):
        TuningStore(path).get("sha256:a", {})


def test_the_fingerprint_does_not_load_llama_cpp() -> None:
    code = (
        "import sys; from slmops.runtime.tuning import device_fingerprint; f = device_fingerprint(); "
        "print(int('llama_cpp' in sys.modules), f['cpu_count'] >= 1, f['llama_cpp_python'] != 'unknown')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()

    assert out == ["0", "True", "True"]


# ----------------------------------------------------------------------------------------------- wait policy


def _policy_after_import(env: dict[str, str], before: str) -> list[str]:
    code = (
        "import os, sys\n"
        "from slmops.runtime import tuning\n"
        f"{before}\n"
        "from slmops.runtime.backend import _import_llama_cpp\n"
        "_import_llama_cpp()\n"
        "late = tuning.apply_wait_policy('active')\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), tuning.loaded_wait_policy(), late, tuning.user_wait_policy())\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SLMOPS_SET_OMP_WAIT_POLICY")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**clean, **env}
    )
    return result.stdout.split()


def test_the_process_loads_llama_cpp_with_the_applied_policy_else_the_fallback() -> None:
    # nothing measured: the fallback, which is not mistaken for the user's choice
    assert _policy_after_import({}, "pass") == ["passive", "passive", "False", "None"]
    applied = _policy_after_import({}, "assert tuning.apply_wait_policy('active')")
    assert applied == ["active", "active", "False", "None"]  # set before the import; refused after it
    # bounded: OMP_WAIT_POLICY stays unset (the OpenMP runtime's default) and the passive fallback does not apply
    bounded = _policy_after_import({}, "assert tuning.apply_wait_policy('bounded')")
    assert bounded == ["None", "bounded", "False", "None"]
    user = _policy_after_import({"OMP_WAIT_POLICY": "passive"}, "assert not tuning.apply_wait_policy('active')")
    assert user == ["passive", "passive", "False", "passive"]  # the user's choice stands


# ----------------------------------------------------------------------------------------------- slmops serve


def test_serve_threads_auto_measures_prints_and_serves_the_choice(tiny_model: Path) -> None:
    import httpx

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    argv = [sys.executable, "-m", "slmops", "serve", str(tiny_model), "--port", "0", "--tune-budget-s", "20"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "serving" in line, proc.stderr.read() if proc.stderr else ""
            url = line.split(" on ")[1].split("/v1")[0]
            reply = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
            assert reply.status_code == 200
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    assert "measuring serving configurations" in err and "chose " in err and "decode tok/s" in err
    assert err.count("chosen") == 1


def test_serve_rejects_a_thread_count_that_is_not_auto_or_positive(tiny_model: Path) -> None:
    argv = [sys.executable, "-m", "slmops", "serve", str(tiny_model), "--port", "0", "--threads", "many"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)

    assert result.returncode != 0 and "'auto' or a positive integer" in result.stdout + result.stderr


@pytest.mark.integration
def test_gemma_is_tuned_on_this_device(gemma_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outcome = tune(gemma_gguf, "sha256:gemma", config=TuningConfig(budget_s=90.0))

    with capsys.disabled():
        for m in outcome.measurements:
            print(
                f"{m.candidate.label()}: prefill {m.prefill_tokens_per_s:.1f} decode {m.decode_tokens_per_s:.1f} tok/s"
            )
        print(f"chosen: {outcome.tuning}; not measured: {[c.label() for c in outcome.not_measured]}")
    assert outcome.measurements and not outcome.failures
    for m in outcome.measurements:
        assert (m.child_threads, m.child_wait_policy) == (m.candidate.threads, m.candidate.omp_wait_policy or "passive")
    best = max(m.decode_tokens_per_s for m in outcome.measurements)
    assert outcome.tuning.decode_tokens_per_s >= 0.97 * best - 1e-3
