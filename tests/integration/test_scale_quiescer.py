"""QUIESCE_MODE=scale against a real Kubernetes cluster: a Deployment is scaled to 0 for the
copy, its replica count kept in its annotation, and scaled back — in a `finally`, and by the
next run after the agent was killed.

These tests need a cluster: they run only when KUBECONFIG names one (its current context must
be allowed to create and delete a namespace), and are skipped otherwise — also in CI, where
missing components are otherwise a failure: no Kubernetes API server can run on the machines
this project is built on, so CI has none to start. The image the test pods run is
K8S_TEST_IMAGE (default `busybox:1.36`); the cluster must be able to pull or have it.
There are deliberately no tests of this quiescer against a mocked API.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_agent, start_agent, wait_until

if not os.environ.get("KUBECONFIG"):
    pytest.skip(
        "QUIESCE_MODE=scale needs a real Kubernetes cluster: set KUBECONFIG to run these "
        "tests. Skipped, also in CI: no Kubernetes API server can run on this project's "
        "machines",
        allow_module_level=True,
    )

from kubernetes import client, config

from agent.config import Workload
from agent.quiesce.scale import ANNOTATION, ScaleQuiescer

IMAGE = os.environ.get("K8S_TEST_IMAGE", "busybox:1.36")
REPLICAS = 2


class Cluster:
    def __init__(self, namespace: str) -> None:
        config.load_kube_config()
        self.namespace = namespace
        self.core = client.CoreV1Api()
        self.apps = client.AppsV1Api()

    def create_deployment(self, name: str) -> Workload:
        labels = {"app": name}
        self.apps.create_namespaced_deployment(
            self.namespace,
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name},
                "spec": {
                    "replicas": REPLICAS,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "terminationGracePeriodSeconds": 1,
                            "containers": [
                                {
                                    "name": "app",
                                    "image": IMAGE,
                                    "command": [
                                        "sh",
                                        "-c",
                                        "trap 'exit 0' TERM; while true; do sleep 1; done",
                                    ],
                                }
                            ],
                        },
                    },
                },
            },
        )
        wait_until(lambda: self.ready(name) == REPLICAS, timeout=180, interval=1)
        return Workload("deployment", name)

    def deployment(self, name: str) -> dict:
        body = self.apps.read_namespaced_deployment(name, self.namespace)
        return client.ApiClient().sanitize_for_serialization(body)

    def replicas(self, name: str) -> int:
        return int(self.deployment(name)["spec"].get("replicas", 0))

    def annotation(self, name: str) -> str | None:
        return (self.deployment(name)["metadata"].get("annotations") or {}).get(ANNOTATION)

    def ready(self, name: str) -> int:
        return int(self.deployment(name).get("status", {}).get("readyReplicas") or 0)

    def pods(self, name: str) -> list[str]:
        found = self.core.list_namespaced_pod(self.namespace, label_selector=f"app={name}")
        return [pod.metadata.name for pod in found.items]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    namespace = f"bt-scale-{uuid.uuid4().hex[:8]}"
    kube = Cluster(namespace)
    kube.core.create_namespace(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    )
    yield kube
    kube.core.delete_namespace(namespace)


def scale_env(cluster: Cluster, workload: Workload, tmp_path: Path, **extra: str) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "KUBECONFIG", "PYTHONPATH")
    }
    env.update(
        SOURCE_ID="test-source",
        DATA_PATHS=str(data),
        HANDOVER_DIR=str(tmp_path / "handover"),
        SOURCE_STORE_DIR=str(tmp_path / "store"),
        QUIESCE_MODE="scale",
        K8S_NAMESPACE=cluster.namespace,
        K8S_WORKLOADS=str(workload),
        STOP_TIMEOUT="5",
        **extra,
    )
    return env


def test_a_deployment_is_scaled_to_0_with_its_count_annotated_and_scaled_back(cluster, tmp_path):
    web = cluster.create_deployment("web")
    quiescer = ScaleQuiescer(tmp_path / "quiesced.json", cluster.namespace, (web,), 5)

    selected = quiescer.select()
    quiescer.quiesce(selected)
    try:
        assert cluster.replicas("web") == 0
        assert cluster.annotation("web") == str(REPLICAS)
        assert cluster.pods("web") == []
    finally:
        quiescer.resume()

    assert cluster.replicas("web") == REPLICAS
    assert cluster.annotation("web") is None
    wait_until(lambda: cluster.ready("web") == REPLICAS, timeout=180, interval=1)
    assert not (tmp_path / "quiesced.json").exists()


def test_a_backup_scales_the_workload_down_and_up_again(cluster, tmp_path):
    web = cluster.create_deployment("web")

    result = run_agent(scale_env(cluster, web, tmp_path), "source", "backup", timeout=300)

    assert result.returncode == 0, result.stderr
    assert "scaled deployment/web from 2 to 0 replicas" in result.stderr
    assert cluster.replicas("web") == REPLICAS and cluster.annotation("web") is None
    assert len(list((tmp_path / "handover" / "data").iterdir())) == 1


def test_a_run_killed_while_scaled_to_0_is_repaired_by_the_next_run_from_the_annotation(
    cluster, tmp_path
):
    web = cluster.create_deployment("web")
    (tmp_path / "data").mkdir()
    # A copy of several seconds while the application is stopped: the window for the kill.
    (tmp_path / "data" / "random.bin").write_bytes(os.urandom(8 << 20))
    env = scale_env(cluster, web, tmp_path, COLLECT_MODE="direct", ZSTD_LEVEL="19")
    agent = start_agent(env, "source", "backup")
    try:
        wait_until(
            lambda: cluster.pods("web") == [] and cluster.annotation("web") is not None,
            timeout=120,
            interval=0.2,
        )
        agent.send_signal(signal.SIGKILL)
        agent.communicate(timeout=60)
    finally:
        agent.kill()
        agent.communicate()
    time.sleep(2)
    assert cluster.replicas("web") == 0 and cluster.annotation("web") == str(REPLICAS)
    # The next run repairs it even without the local record: the annotation is enough.
    (tmp_path / "handover" / ".state" / "quiesced.json").unlink(missing_ok=True)

    result = run_agent(
        {**env, "COLLECT_MODE": "mirror", "ZSTD_LEVEL": "1"}, "source", "backup", timeout=300
    )

    assert result.returncode == 0, result.stderr
    assert "an earlier run was interrupted with the application quiesced" in result.stderr
    assert cluster.replicas("web") == REPLICAS and cluster.annotation("web") is None
    wait_until(lambda: cluster.ready("web") == REPLICAS, timeout=180, interval=1)


def test_the_agent_refuses_to_scale_a_workload_it_runs_in(cluster, tmp_path):
    web = cluster.create_deployment("web")
    own_pod = cluster.pods("web")[0]

    result = run_agent(
        scale_env(cluster, web, tmp_path, POD_NAME=own_pod), "source", "backup", timeout=120
    )

    assert result.returncode == 1
    assert f"the agent runs in pod {own_pod} of deployment/web" in result.stderr
    assert cluster.replicas("web") == REPLICAS and cluster.annotation("web") is None
