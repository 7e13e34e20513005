"""Every manifest in k8s/ is valid against the Kubernetes API schemas, checked offline with
`kubernetes-validate` (it ships the schemas): strict, so a misspelt or misplaced field fails
too. What the manifests say is checked here where a schema cannot see it (the commands exist,
the settings are declared, the Role allows what the scale quiescer calls)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate  # the test extra: pip install -e '.[test]'
import pytest
import yaml

from agent.cli import _parser
from agent.config import SETTINGS_BY_ENV, parse_source

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
VERSION = "1.30"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}:{d['kind']}/{d['metadata']['name']}", d)
        for path in MANIFESTS
        for d in documents(path)
    ]


def validate(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, VERSION, strict=True)


def test_there_are_manifests_for_the_sink_the_source_cronjob_and_the_sidecar():
    assert {p.name for p in MANIFESTS} >= {
        "sink-cronjobs.yaml",
        "source-cronjob.yaml",
        "source-sidecar.yaml",
    }


@pytest.mark.parametrize(
    "name, document", all_documents(), ids=[name for name, _ in all_documents()]
)
def test_every_manifest_is_valid_for_kubernetes(name, document):
    validate(document)


@pytest.mark.parametrize("breakage", ["misspelt field", "wrong type", "missing field"])
def test_the_validation_catches_a_broken_manifest(breakage):
    # The check above must be able to fail: break a valid CronJob three ways.
    [cronjob] = [d for _, d in all_documents() if d["kind"] == "CronJob"][:1]
    broken = copy.deepcopy(cronjob)
    spec = broken["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if breakage == "misspelt field":
        spec["restartPolicyy"] = spec.pop("restartPolicy")
    elif breakage == "wrong type":
        broken["spec"]["concurrencyPolicy"] = ["Forbid"]
    else:
        del spec["containers"][0]["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name, document in all_documents():
        if document["kind"] == "CronJob":
            found.append((name, document["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif document["kind"] in ("Deployment", "StatefulSet"):
            found.append((name, document["spec"]["template"]["spec"]))
    return found


def agent_containers() -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, c)
        for name, spec in pod_specs()
        for c in spec["containers"]
        if c["image"].startswith("backup-agent-")
    ]


def test_every_agent_command_is_one_the_agent_has():
    parser = _parser()
    for name, container in agent_containers():
        command = container["command"]
        if command == ["start-gateway"]:
            assert (ROOT / "deploy" / "gateway" / "start-gateway").is_file()
            continue
        assert command[0] == "backup-agent", name
        parser.parse_args(command[1:])  # exits (SystemExit) on an unknown command


def config_maps() -> dict[str, dict[str, str]]:
    return {
        d["metadata"]["name"]: d.get("data", {})
        for _, d in all_documents()
        if d["kind"] == "ConfigMap"
    }


def environment(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps()[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def test_every_setting_given_to_an_agent_is_declared_and_valid():
    undeclared = {"HOME", "POD_NAME", "GATEWAY_SECRETS_DIR"}  # not settings of the agent
    for name, container in agent_containers():
        env = environment(container)
        assert set(env) - undeclared <= set(SETTINGS_BY_ENV), name
        if "SOURCE_ID" in env:
            parse_source(env)  # raises ConfigError naming every invalid setting


def test_the_sink_cronjobs_run_one_at_a_time_and_not_as_root():
    for name, document in all_documents():
        if document["kind"] == "CronJob":
            assert document["spec"]["concurrencyPolicy"] == "Forbid", name
    for name, spec in pod_specs():
        if "sink" in name:
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["securityContext"]["runAsUser"] != 0, name


def test_the_sidecar_shares_the_process_namespace_and_quiesces_by_signal():
    [(_, spec)] = [(n, s) for n, s in pod_specs() if n.startswith("source-sidecar.yaml")]
    assert spec["shareProcessNamespace"] is True
    [agent] = [
        c for c in spec["containers"] if c.get("command", [])[:2] == ["backup-agent", "cron"]
    ]
    assert environment(agent)["QUIESCE_MODE"] == "signal"
    assert "KILL" in agent["securityContext"]["capabilities"]["add"]


def test_the_source_cronjobs_role_allows_what_the_scale_quiescer_calls():
    [role] = [d for _, d in all_documents() if d["kind"] == "Role"]
    allowed = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # agent/quiesce/scale.py: read and annotate the workloads, patch their scale, list pods.
    needed = {
        ("apps", "deployments", "get"),
        ("apps", "deployments", "patch"),
        ("apps", "statefulsets", "get"),
        ("apps", "statefulsets", "patch"),
        ("apps", "deployments/scale", "patch"),
        ("apps", "statefulsets/scale", "patch"),
        ("", "pods", "list"),
    }
    assert needed <= allowed
    assert not {verb for _, _, verb in allowed} & {"create", "delete", "deletecollection", "*"}
    [(_, spec)] = [(n, s) for n, s in pod_specs() if n.startswith("source-cronjob.yaml")]
    assert spec["serviceAccountName"] == role["metadata"]["name"].removesuffix("-scale")
