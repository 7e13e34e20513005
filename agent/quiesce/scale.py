"""The `scale` quiescer: stops a Kubernetes application by scaling its workloads (Deployments,
StatefulSets: K8S_WORKLOADS) to 0 replicas, and scales them back afterwards.

Before a workload is scaled to 0 its replica count is written to its own annotation
`backup-agent/replicas` (and to the local record), so a run that was killed is repaired by the
next one (`reconcile` reads the annotation, scales back, removes it) — also from another pod
or node, since the annotation lives in the cluster. 1.a waits until the workload's pods are
gone, not merely asked to go. A workload someone scaled up again meanwhile is left as it is.

The official `kubernetes` client is imported only in this mode; it reads the in-cluster
ServiceAccount, or KUBECONFIG outside a cluster. The agent needs, in the namespace: get and
patch on deployments/statefulsets and their `scale` subresource, get/list/watch on pods
(k8s/source-cronjob.yaml has that Role).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import LabelSelector, Workload
from agent.quiesce.record import read_record, write_record

logger = logging.getLogger(__name__)

MODE = "scale"
ANNOTATION = "backup-agent/replicas"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_REQUEST_TIMEOUT = 30
_POLL = 0.5
_SLACK = 30  # seconds beyond the pods' grace period for the kubelet to report them gone


class KubernetesUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Scaled:
    """A workload the quiescer scales to 0, and the replica count it had."""

    namespace: str
    workload: Workload
    replicas: int

    @property
    def name(self) -> str:
        return str(self.workload)


def label_selector(selector: dict[str, Any]) -> str:
    """Given a workload's `spec.selector` (matchLabels, matchExpressions), return it as a label
    selector string for a pod listing. Raise ValueError if it selects nothing specific."""
    parts = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = ",".join(expression.get("values") or [])
        parts.append(
            {
                "In": f"{key} in ({values})",
                "NotIn": f"{key} notin ({values})",
                "Exists": key,
                "DoesNotExist": f"!{key}",
            }[operator]
        )
    if not parts:
        raise ValueError("the workload's selector is empty")
    return ",".join(parts)


def owned_by(pod: dict[str, Any], workload: Workload) -> bool:
    """Whether `pod` (as JSON) belongs to `workload`: a StatefulSet owns its pods; a Deployment
    owns them through a ReplicaSet named `<deployment>-<pod-template-hash>`."""
    metadata = pod.get("metadata") or {}
    if workload.kind == "statefulset":
        wanted = ("StatefulSet", workload.name)
    else:
        template_hash = (metadata.get("labels") or {}).get("pod-template-hash", "")
        wanted = ("ReplicaSet", f"{workload.name}-{template_hash}")
    return any(
        (ref.get("kind"), ref.get("name")) == wanted
        for ref in metadata.get("ownerReferences") or []
    )


class ScaleQuiescer:
    """Scales workloads to 0 and remembers them: in their annotation and on disk first, then
    in memory."""

    verb = "scale to 0"

    def __init__(
        self, record_path: Path, namespace: str, workloads: tuple[Workload, ...], stop_timeout: int
    ) -> None:
        self.record_path = record_path
        self.workloads = workloads
        self.stop_timeout = stop_timeout
        self.scaled: list[Scaled] = []
        self._connect()
        self.namespace = namespace or self._default_namespace()

    # -- the API

    def _connect(self) -> None:
        try:
            from kubernetes import client, config
        except ImportError:
            raise KubernetesUnavailable(
                "QUIESCE_MODE=scale needs the Python package "
                "`kubernetes`: install `backup-agent[kubernetes]` "
                "(the source image has it)"
            ) from None
        self._in_cluster = True
        try:
            config.load_incluster_config()
        except config.ConfigException:
            self._in_cluster = False
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as exc:
                raise KubernetesUnavailable(
                    f"no Kubernetes API to talk to ({exc}): run the agent in the cluster with "
                    "a ServiceAccount, or set KUBECONFIG"
                ) from None
        self._api_client = client.ApiClient()
        self._apps = client.AppsV1Api(self._api_client)
        self._core = client.CoreV1Api(self._api_client)
        self._api_exception = client.ApiException

    def _default_namespace(self) -> str:
        if self._in_cluster and SERVICE_ACCOUNT_NAMESPACE.is_file():
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        from kubernetes import config

        try:
            _, current = config.list_kube_config_contexts()
            return str(current["context"].get("namespace") or "default")
        except (config.ConfigException, KeyError, TypeError):
            return "default"

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the API; return the answer as JSON (dicts and lists, camelCase keys). Raise
        LookupError on 404 and RuntimeError naming `what` on any other failure."""
        try:
            answer = function(*args, _request_timeout=_REQUEST_TIMEOUT, **kwargs)
        except self._api_exception as exc:
            if exc.status == 404:
                raise LookupError(what) from None
            hint = (
                "; the agent's ServiceAccount lacks the permission (see the Role in "
                "k8s/source-cronjob.yaml)"
                if exc.status == 403
                else ""
            )
            raise RuntimeError(f"{what}: {exc.status} {exc.reason}{hint}") from None
        except Exception as exc:  # urllib3 connection and timeout errors
            raise RuntimeError(f"{what}: {exc}") from None
        return self._api_client.sanitize_for_serialization(answer)

    def _read(self, namespace: str, workload: Workload) -> dict[str, Any]:
        read = (
            self._apps.read_namespaced_deployment
            if workload.kind == "deployment"
            else self._apps.read_namespaced_stateful_set
        )
        answer: dict[str, Any] = self._call(
            f"read {workload} in {namespace}", read, workload.name, namespace
        )
        return answer

    def _annotate(self, namespace: str, workload: Workload, value: str | None) -> None:
        patch = (
            self._apps.patch_namespaced_deployment
            if workload.kind == "deployment"
            else self._apps.patch_namespaced_stateful_set
        )
        body = {"metadata": {"annotations": {ANNOTATION: value}}}  # null removes it
        self._call(f"annotate {workload} in {namespace}", patch, workload.name, namespace, body)

    def _scale(self, namespace: str, workload: Workload, replicas: int) -> None:
        patch = (
            self._apps.patch_namespaced_deployment_scale
            if workload.kind == "deployment"
            else self._apps.patch_namespaced_stateful_set_scale
        )
        self._call(
            f"scale {workload} in {namespace} to {replicas}",
            patch,
            workload.name,
            namespace,
            {"spec": {"replicas": replicas}},
        )

    def _pods(self, namespace: str, workload: Workload, selector: str) -> list[dict[str, Any]]:
        answer = self._call(
            f"list the pods of {workload} in {namespace}",
            self._core.list_namespaced_pod,
            namespace,
            label_selector=selector,
        )
        return [pod for pod in answer.get("items") or [] if owned_by(pod, workload)]

    # -- selecting

    def nothing_selected(self, selector: LabelSelector) -> str:
        return f"no workload of K8S_WORKLOADS has replicas in namespace {self.namespace}"

    def select(self, selector: LabelSelector | None = None, project: str = "") -> list[Scaled]:
        """Return the workloads of K8S_WORKLOADS that have replicas, in the order given.
        `selector` and `project` (Docker labels) do not apply here. Raise RuntimeError if one
        does not exist, or if the agent runs in one of its pods (it would stop itself)."""
        own_pod = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME", "")
        found = []
        for workload in self.workloads:
            try:
                body = self._read(self.namespace, workload)
            except LookupError:
                raise RuntimeError(
                    f"K8S_WORKLOADS names {workload}, which does not exist in "
                    f"namespace {self.namespace}"
                ) from None
            replicas = int((body.get("spec") or {}).get("replicas", 1))
            if replicas == 0:
                logger.info("%s has 0 replicas; nothing to stop", workload)
                continue
            selector_text = label_selector((body.get("spec") or {}).get("selector") or {})
            pods = self._pods(self.namespace, workload, selector_text)
            if own_pod and any(p["metadata"].get("name") == own_pod for p in pods):
                raise RuntimeError(
                    f"the agent runs in pod {own_pod} of {workload}: scaling it "
                    "to 0 would stop the agent too; run the agent as its own "
                    "CronJob, or as a sidecar with QUIESCE_MODE=signal"
                )
            found.append(Scaled(self.namespace, workload, replicas))
        return found

    def run_label_commands(
        self,
        label: str,
        selector: LabelSelector | None = None,
        project: str = "",
        source_id: str = "",
    ) -> list[str]:
        """Pre- and post-commands are Docker labels: there are none to run in this mode."""
        return []

    # -- stop and start

    def quiesce(self, selected: list[Scaled]) -> None:
        """Write the record, then for each workload: its replica count into its annotation,
        then scale it to 0; then wait until all their pods are gone. Whatever was scaled before
        a failure is remembered, so `resume` scales it back. Raise RuntimeError if the pods are
        not gone in time (the longer of STOP_TIMEOUT and their grace period, plus 30 s)."""
        self._write_record(selected)
        grace = float(self.stop_timeout)
        for item in selected:
            body = self._read(item.namespace, item.workload)
            template = ((body.get("spec") or {}).get("template") or {}).get("spec") or {}
            grace = max(grace, float(template.get("terminationGracePeriodSeconds", 30)))
            self._annotate(item.namespace, item.workload, str(item.replicas))
            self.scaled.append(item)
            self._scale(item.namespace, item.workload, 0)
            logger.info("scaled %s from %d to 0 replicas", item.workload, item.replicas)
        deadline = time.monotonic() + grace + _SLACK
        for item in selected:
            self._wait_gone(item, deadline)

    def _wait_gone(self, item: Scaled, deadline: float) -> None:
        body = self._read(item.namespace, item.workload)
        selector = label_selector((body.get("spec") or {}).get("selector") or {})
        while True:
            pods = self._pods(item.namespace, item.workload, selector)
            if not pods:
                logger.info("the pods of %s are gone", item.workload)
                return
            if time.monotonic() > deadline:
                names = ", ".join(p["metadata"]["name"] for p in pods)
                raise RuntimeError(f"the pods of {item.workload} are not gone in time: {names}")
            time.sleep(_POLL)

    def resume(self) -> None:
        """Scale every workload this run scaled to 0 back to its count, in reverse order, and
        remove its annotation; try all of them even if one fails. Remove the record once all
        are back. Raise RuntimeError naming those that could not be scaled back."""
        failures = []
        for item in reversed(self.scaled):
            try:
                self._scale_back(item.namespace, item.workload, item.replicas)
            except RuntimeError as exc:
                failures.append(str(exc))
        if failures:
            raise RuntimeError("could not scale back: " + "; ".join(failures))
        self.scaled = []
        self.record_path.unlink(missing_ok=True)

    def _scale_back(self, namespace: str, workload: Workload, remembered: int | None) -> bool:
        """Scale `workload` back to the count in its annotation (else `remembered`) if it is at
        0, and remove the annotation. Return whether there was anything to do."""
        try:
            body = self._read(namespace, workload)
        except LookupError:
            logger.warning("%s no longer exists in %s; nothing to scale back", workload, namespace)
            return False
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        noted = annotations.get(ANNOTATION)
        wanted = int(noted) if noted is not None and noted.isdigit() else remembered
        if wanted is None:
            return False
        current = int((body.get("spec") or {}).get("replicas", 0))
        if current == 0:
            self._scale(namespace, workload, wanted)
            logger.info("scaled %s back to %d replicas", workload, wanted)
        elif noted is None:
            return False  # the killed run never got to annotate it, let alone scale it
        else:
            logger.warning(
                "%s has %d replicas again (scaled by someone else meanwhile); left as it is",
                workload,
                current,
            )
        if noted is not None:
            self._annotate(namespace, workload, None)
        return True

    def reconcile(self) -> list[str]:
        """Scale back every workload an earlier, killed run left at 0: those named in the local
        record and every workload of K8S_WORKLOADS that carries the annotation. Remove the
        annotations and the record. Return their names. Raise RuntimeError if one cannot be
        scaled back (the record and annotation are kept for the next try)."""
        record = read_record(self.record_path, (MODE,)) or {"workloads": []}
        remembered: dict[tuple[str, Workload], int | None] = {
            (str(e["namespace"]), Workload(str(e["kind"]), str(e["name"]))): int(e["replicas"])
            for e in record["workloads"]
        }
        for workload in self.workloads:
            remembered.setdefault((self.namespace, workload), None)
        done, failures = [], []
        for (namespace, workload), replicas in remembered.items():
            try:
                if self._scale_back(namespace, workload, replicas):
                    done.append(str(workload))
            except RuntimeError as exc:
                failures.append(str(exc))
        if done:
            logger.warning(
                "an earlier run was interrupted with the application quiesced; scaled %s back",
                ", ".join(done),
            )
        if failures:
            raise RuntimeError("could not scale back: " + "; ".join(failures))
        self.record_path.unlink(missing_ok=True)
        return done

    def _write_record(self, selected: list[Scaled]) -> None:
        write_record(
            self.record_path,
            {
                "mode": MODE,
                "workloads": [
                    {
                        "namespace": s.namespace,
                        "kind": s.workload.kind,
                        "name": s.workload.name,
                        "replicas": s.replicas,
                    }
                    for s in selected
                ],
            },
        )
