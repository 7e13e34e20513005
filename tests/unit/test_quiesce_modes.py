"""The settings of the `signal` and `scale` quiesce modes, and the pure logic of their quiescers
(no processes are signalled and no API is called here: tests/integration/test_signal_quiescer.py
and tests/integration/test_scale_quiescer.py do that for real)."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, Workload, parse_source, parse_workloads
from agent.quiesce.scale import label_selector, owned_by
from agent.quiesce.signal import Stat, descendants, family, parse_stat

VALID = {"SOURCE_ID": "shop", "DATA_PATHS": "/srv/data"}


def problems(values: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_source({**VALID, **values})
    return caught.value.problems


def test_signal_mode_takes_a_process_pattern():
    cfg = parse_source({**VALID, "QUIESCE_MODE": "signal", "SIGNAL_PROCESSES": "^nginx: "})
    assert (cfg.quiesce_mode, cfg.signal_processes) == ("signal", "^nginx: ")


def test_signal_mode_without_a_pattern_names_the_variable():
    [problem] = problems({"QUIESCE_MODE": "signal"})
    assert problem.startswith("SIGNAL_PROCESSES: required with QUIESCE_MODE=signal")


@pytest.mark.parametrize("pattern", ["(", "[a-", ".*", "x|"])
def test_a_pattern_that_does_not_compile_or_matches_everything_is_refused(pattern):
    [problem] = problems({"QUIESCE_MODE": "signal", "SIGNAL_PROCESSES": pattern})
    assert problem.startswith(f"SIGNAL_PROCESSES: {pattern!r} is not allowed")


def test_scale_mode_takes_workloads_and_a_namespace():
    cfg = parse_source(
        {
            **VALID,
            "QUIESCE_MODE": "scale",
            "K8S_NAMESPACE": "shop-prod",
            "K8S_WORKLOADS": "deployment/web, statefulset/db-0.x",
        }
    )
    assert cfg.k8s_namespace == "shop-prod"
    assert cfg.k8s_workloads == (Workload("deployment", "web"), Workload("statefulset", "db-0.x"))
    assert [str(w) for w in cfg.k8s_workloads] == ["deployment/web", "statefulset/db-0.x"]


def test_scale_mode_without_workloads_names_the_variable():
    [problem] = problems({"QUIESCE_MODE": "scale"})
    assert problem.startswith("K8S_WORKLOADS: required with QUIESCE_MODE=scale")


@pytest.mark.parametrize(
    "text",
    [
        "web",
        "pod/web",
        "deployment/Web",
        "deployment/",
        "deployment/web,deployment/web",
        "daemonset/agent",
        "deployment/-web",
        "deployment/" + "a" * 254,
    ],
)
def test_malformed_workloads_are_refused(text):
    with pytest.raises(ValueError):
        parse_workloads(text)
    [problem] = problems({"QUIESCE_MODE": "scale", "K8S_WORKLOADS": text})
    assert problem.startswith("K8S_WORKLOADS: ")


@pytest.mark.parametrize("namespace", ["Shop", "shop_prod", "-shop", "a" * 64])
def test_malformed_namespaces_are_refused(namespace):
    [problem] = problems({"K8S_NAMESPACE": namespace})
    assert problem.startswith("K8S_NAMESPACE: ")


def test_unknown_modes_list_every_mode():
    [problem] = problems({"QUIESCE_MODE": "freeze"})
    assert problem.endswith("use one of: stop, pause, signal, scale")


# ---------------------------------------------------------------- /proc/<pid>/stat


def test_stat_fields_are_counted_from_the_last_parenthesis():
    # The command name may hold spaces and parentheses.
    line = (
        "4242 (evil) S 1 (x)) R 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 "
        "987654 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n"
    )
    assert parse_stat(line) == Stat("R", 17, 987654)


@pytest.mark.parametrize("line", ["", "4242 no parenthesis", "1 (sh) S 0 1"])
def test_malformed_stat_lines_are_refused(line):
    with pytest.raises(ValueError):
        parse_stat(line)


def tree(*edges: tuple[int, int]) -> dict[int, Stat]:
    return {pid: Stat("S", ppid, pid) for pid, ppid in edges}


def test_the_agents_family_is_itself_its_ancestors_and_its_descendants():
    stats = tree((1, 0), (10, 1), (20, 10), (30, 20), (31, 30), (40, 1), (41, 40))
    assert family(stats, 20) == {1, 10, 20, 30, 31}
    assert descendants(stats, {40}) == {40, 41}


# ---------------------------------------------------------------- workloads and their pods


def test_a_workload_selector_becomes_a_label_selector():
    assert label_selector(
        {
            "matchLabels": {"app": "shop", "tier": "web"},
            "matchExpressions": [
                {"key": "track", "operator": "In", "values": ["stable", "canary"]},
                {"key": "env", "operator": "NotIn", "values": ["dev"]},
                {"key": "owner", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        }
    ) == ("app=shop,tier=web,track in (stable,canary),env notin (dev),owner,!legacy")


def test_an_empty_selector_is_refused():
    with pytest.raises(ValueError):
        label_selector({})


def pod(labels: dict[str, str], *owners: tuple[str, str]) -> dict[str, object]:
    return {
        "metadata": {
            "name": "p",
            "labels": labels,
            "ownerReferences": [{"kind": k, "name": n} for k, n in owners],
        }
    }


def test_only_pods_the_workload_owns_count():
    web = Workload("deployment", "web")
    assert owned_by(pod({"pod-template-hash": "5d9f"}, ("ReplicaSet", "web-5d9f")), web)
    assert not owned_by(pod({"pod-template-hash": "5d9f"}, ("ReplicaSet", "web-api-5d9f")), web)
    assert not owned_by(pod({}), web)
    db = Workload("statefulset", "db")
    assert owned_by(pod({}, ("StatefulSet", "db")), db)
    assert not owned_by(pod({}, ("StatefulSet", "db2")), db)
