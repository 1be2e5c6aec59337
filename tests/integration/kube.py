"""A Kubernetes API for tests: kmock's emulator, extended, and a kubelet that runs pods on Docker.

No API server can run on this machine, so the controller's Kubernetes code
talks to ``kmock`` (a maintained HTTP emulator of the API) over real HTTP,
with the official client, made to behave as a real API server in what the
controller relies on by :class:`ApiServer` (``apiserver.py``: its docstring
lists what it does and does not do, ``test_kube_conformance.py`` checks each).

:class:`Kubelet` stands in for the controller manager and kubelet: for each
Deployment it keeps ``spec.replicas`` Pod objects and runs each pod's
container on the real Docker engine (its image, command and args, env with
Secret references resolved, user, read-only root, dropped capabilities,
memory and CPU limits; PVCs as a host directory per claim, kept across its
pods; emptyDirs as tmpfs, or as a host
directory shared with the pod's init containers when it has any, which run
to completion first; Secret volumes as read-only files, root's, group
``fsGroup`` made group-readable as the kubelet does, laid out as its atomic
writer does (``..data``) and written again when the Secret changes), reports the
container's IP as the pod IP and its Ready condition from the
``readinessProbe`` when it is an ``httpGet`` (without one, or with a grpc
or exec probe, which it does not run, a running unpaused container is
ready),
restarts it when it exits with the kubelet's back-off (10 s doubling to 300 s,
:class:`KubeletBackoff`), reporting it meanwhile as waiting in
``CrashLoopBackOff`` with ``lastState.terminated`` and ``restartCount`` as a
kubelet does;
schedules each pod onto one of its named nodes as the scheduler would (its
claims must exist; a required pod affinity by ``matchLabels`` over
``kubernetes.io/hostname`` must hold, the first pod of a group matching its
own term going anywhere; the node with the fewest pods wins), setting
``spec.nodeName`` or reporting ``PodScheduled=False``/``Unschedulable``;
keeps a pod whose ReadWriteOnce claim a pod on another node uses in
``ContainerCreating`` with the attach/detach controller's Multi-Attach error;
reports an image that is not there as ``ErrImagePull``, then
``ImagePullBackOff``, and starts the pod once it is (with ``pull_seconds``,
the first pod of an image on a node waits that long in ``ContainerCreating``,
as for a pull); and
stops and removes pods when the Deployment goes or is scaled down.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import os
import re
import shutil
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import kmock
import yaml
from kubernetes import client as k8s_client

from controller.spec import quantity

from .apiserver import (
    DEPLOYMENTS,
    ENDPOINT_SLICES,
    PODS,
    SERVICE_NAME_LABEL,
    SERVICES,
    ApiServer,
    matches,
)
from .apiserver import now as _now

KUBELET_LABEL = "blackhole.dev/test-kubelet"
CONTAINER_NAME = "plugin"
"""The name the kubelet reports its pods' (single) container under."""


def _seconds_between(started: str, finished: str) -> float | None:
    """Seconds from Docker's ``StartedAt`` to its ``FinishedAt`` (nanosecond RFC 3339)."""
    try:
        start, end = (
            datetime.datetime.fromisoformat(t[:26].rstrip("Z") + "+00:00")
            for t in (started, finished)
        )
    except ValueError:
        return None
    return (end - start).total_seconds()


def _labels_match(labels: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


@dataclass(frozen=True)
class KubeletBackoff:
    """The kubelet's restart back-off for crashed containers (its defaults).

    The first restart comes ``initial`` seconds after the exit, each further one
    twice as late, at most ``limit``; a container that ran ``reset`` seconds
    before it exited starts over at ``initial`` (kubelet's ``backOffPeriod`` and
    ``MaxContainerBackOff``: 10 s doubling to 300 s, reset after 10 minutes).
    """

    initial: float = 10.0
    limit: float = 300.0
    reset: float = 600.0

    def delay(self, steps: int) -> float:
        return float(min(self.limit, self.initial * 2.0**steps))


@dataclass
class _Pod:
    name: str
    namespace: str
    deployment_uid: str
    container: str
    restarts: int = 0
    image_id: str = ""
    container_id: str = ""
    last: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    address: str | None = None
    ready: bool = False
    probed: float = 0.0
    restart_at: float | None = None
    """When the kubelet starts the exited container again (its back-off), if it exited."""
    backoff_steps: int = 0
    """Restarts in a row without a long enough run between: the back-off's exponent."""
    node: str = ""
    """The node it is scheduled on ("" while unschedulable)."""
    running: bool = False
    """Its containers were created (scheduled, claims attached, image there)."""
    pulls_failed: int = 0
    pulled_at: float | None = None
    """When its image is pulled onto its node, while it is being pulled."""
    claims: tuple[str, ...] = ()
    """The PersistentVolumeClaims it mounts."""


@dataclass
class _SecretVolume:
    where: Path
    namespace: str
    source: dict[str, Any]
    group: int | None
    version: str = ""
    """The Secret's resourceVersion written last."""


class Kubelet:
    """Runs the pods of the API server's Deployments as Docker containers (see the module)."""

    def __init__(
        self,
        server: ApiServer,
        docker_client: docker.DockerClient,
        session: str,
        logs: Path,
        *,
        backoff: KubeletBackoff | None = None,
        nodes: tuple[str, ...] = ("node-a",),
        pull_seconds: float = 0.0,
    ) -> None:
        self.server = server
        self.pull_seconds = pull_seconds
        """How long the first pod of an image on a node waits in ContainerCreating (its
        pull); the image itself always comes from the Docker engine."""
        self._pulled: set[tuple[str, str]] = set()
        self.backoff = backoff or KubeletBackoff()
        self.nodes = nodes
        """The nodes pods are scheduled on (names only: every pod runs on this Docker)."""
        self.logs = logs
        """Where each pod's output is kept when it is removed (for the failures' reports)."""
        self.volumes = logs.parent / "volumes"
        self.docker = docker_client
        self.session = session
        self.pods: dict[str, list[_Pod]] = {}
        """Deployment uid -> its pods."""
        self._slices: dict[tuple[str, str], dict[str, Any]] = {}
        self._secret_volumes: dict[tuple[str, str], _SecretVolume] = {}
        """(pod, volume) -> the Secret volume, refreshed when its Secret changes."""

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except (docker.errors.DockerException, OSError, RuntimeError, KeyError):
                # A pod that cannot start: said in kubelet.log, and the rest go on.
                self.logs.mkdir(parents=True, exist_ok=True)
                with (self.logs / "kubelet.log").open("a") as log:
                    log.write(traceback.format_exc())
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.2)

    async def sync(self) -> None:
        wanted = {}
        for deployment in self.server.live(DEPLOYMENTS):
            if (deployment.get("spec") or {}).get("replicas", 1):
                wanted[deployment["metadata"]["uid"]] = deployment
        for uid in list(self.pods):
            if uid not in wanted:
                for pod in self.pods.pop(uid):
                    await self._stop(pod)
        existing = {
            (p["metadata"]["namespace"], p["metadata"]["name"]) for p in self.server.live(PODS)
        }
        for uid, deployment in wanted.items():
            pods = self.pods.setdefault(uid, [])
            for pod in [p for p in pods if (p.namespace, p.name) not in existing]:
                # Its Pod object was deleted (an eviction, kubectl delete pod): the kubelet
                # stops it and the ReplicaSet makes another in its place.
                pods.remove(pod)
                await self._stop(pod)
            replicas = int(deployment["spec"].get("replicas", 1))
            while len(pods) > replicas:
                await self._stop(pods.pop())
            for pod in list(pods):
                if pod.running:
                    await self._observe(pod, deployment)
                else:
                    await self._launch(pod, deployment)
            while len(pods) < replicas:
                pods.append(await self._start(deployment))
        self._refresh_secret_volumes()
        await self._endpoint_slices()

    async def _start(self, deployment: dict[str, Any]) -> _Pod:
        metadata = deployment["metadata"]
        namespace = metadata["namespace"]
        template = deployment["spec"]["template"]
        name = f"{metadata['name']}-{uuid.uuid4().hex[:5]}"
        spec = template["spec"]
        pod = _Pod(name, namespace, metadata["uid"], f"bhk-{self.session}-{namespace}-{name}")
        obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now(),
                "labels": dict(template["metadata"]["labels"]),
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": metadata["name"],
                        "uid": metadata["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": spec,
            "status": {"phase": "Pending"},
        }
        await self.server.store(PODS, obj)
        pod.claims = tuple(
            v["persistentVolumeClaim"]["claimName"]
            for v in spec.get("volumes") or []
            if "persistentVolumeClaim" in v
        )
        await self._launch(pod, deployment)
        return pod

    # Scheduling, attaching claims, pulling: what keeps a pod Pending.

    async def _launch(self, pod: _Pod, deployment: dict[str, Any]) -> None:
        """Run the pod's containers once it is scheduled, its claims are attachable and its
        image is there; until then report it Pending with the reason a cluster gives."""
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        if not pod.node:
            node, why = self._schedule(pod, spec)
            if node is None:
                await self._pending(pod, None, why)
                return
            pod.node = node
        if why := self._unattachable(pod):
            await self._pending(pod, {"reason": "ContainerCreating", "message": why}, "")
            return
        try:
            await asyncio.to_thread(self.docker.images.get, container["image"])
        except docker.errors.ImageNotFound:
            pod.pulls_failed += 1
            reason = "ErrImagePull" if pod.pulls_failed == 1 else "ImagePullBackOff"
            message = f'failed to pull image "{container["image"]}": not found'
            await self._pending(pod, {"reason": reason, "message": message}, "")
            return
        if self.pull_seconds and (pod.node, container["image"]) not in self._pulled:
            now = asyncio.get_running_loop().time()
            if pod.pulled_at is None:
                pod.pulled_at = now + self.pull_seconds
            if now < pod.pulled_at:
                await self._pending(pod, {"reason": "ContainerCreating"}, "")
                return
            self._pulled.add((pod.node, container["image"]))
        await asyncio.to_thread(self._run_pod, pod, pod.namespace, spec, container)
        pod.running = True
        await self._observe(pod, deployment)

    def _schedule(self, pod: _Pod, spec: dict[str, Any]) -> tuple[str | None, str]:
        """(the node, or None and why not), as the scheduler picks one: its claims must
        exist, its required pod affinity (``matchLabels`` over ``kubernetes.io/hostname``)
        must hold, and of the nodes left the one with the fewest pods wins (spreading)."""
        claims = {
            (c["metadata"]["namespace"], c["metadata"]["name"])
            for c in self.server.live("v1/persistentvolumeclaims")
        }
        for claim in pod.claims:
            if (pod.namespace, claim) not in claims:
                return None, f'persistentvolumeclaim "{claim}" not found'
        candidates = list(self.nodes)
        own = self._labels_of(pod)
        terms = ((spec.get("affinity") or {}).get("podAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        ) or []
        for term in terms:
            wanted = (term.get("labelSelector") or {}).get("matchLabels") or {}
            hosts = {
                other.node
                for other in self._all_pods()
                if other is not pod
                and other.node
                and other.namespace == pod.namespace
                and _labels_match(self._labels_of(other), wanted)
            }
            if not hosts and _labels_match(own, wanted):
                continue  # the first pod of a group that matches its own term: anywhere
            candidates = [n for n in candidates if n in hosts]
        if not candidates:
            return None, (
                f"0/{len(self.nodes)} nodes are available: {len(self.nodes)} node(s) didn't "
                "match pod affinity rules"
            )
        load = {n: sum(1 for p in self._all_pods() if p.node == n) for n in candidates}
        return min(candidates, key=lambda n: (load[n], n)), ""

    def _unattachable(self, pod: _Pod) -> str:
        """Why a ReadWriteOnce claim of the pod cannot be attached to its node: a pod on
        another node uses it (the attach/detach controller's Multi-Attach error)."""
        for claim in pod.claims:
            users = [
                other.name
                for other in self._all_pods()
                if other is not pod
                and other.running
                and other.node != pod.node
                and other.namespace == pod.namespace
                and claim in other.claims
            ]
            if users:
                return (
                    f'Multi-Attach error for volume "{claim}" Volume is already used by '
                    f"pod(s) {', '.join(users)}"
                )
        return ""

    def _all_pods(self) -> list[_Pod]:
        return [p for pods in self.pods.values() for p in pods]

    def _labels_of(self, pod: _Pod) -> dict[str, str]:
        for live in self.server.live(PODS):
            metadata = live["metadata"]
            if metadata["name"] == pod.name and metadata["namespace"] == pod.namespace:
                return dict(metadata.get("labels") or {})
        return {}

    async def _pending(self, pod: _Pod, waiting: dict[str, Any] | None, unschedulable: str) -> None:
        """Report the pod Pending: unschedulable (``waiting`` None), or scheduled with its
        container waiting (ContainerCreating, ErrImagePull, ImagePullBackOff)."""
        scheduled: dict[str, Any] = {"type": "PodScheduled", "status": "True"}
        if waiting is None:
            scheduled = {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
            }
        status: dict[str, Any] = {
            "phase": "Pending",
            "conditions": [scheduled, {"type": "Ready", "status": "False"}],
        }
        if waiting is not None:
            status["containerStatuses"] = [
                {
                    "name": CONTAINER_NAME,
                    "image": "",
                    "imageID": "",
                    "state": {"waiting": waiting},
                    "lastState": {},
                    "restartCount": 0,
                    "ready": False,
                }
            ]
        await self._store_status(pod, status)

    def _run_pod(
        self, pod: _Pod, namespace: str, spec: dict[str, Any], container: dict[str, Any]
    ) -> None:
        shared = bool(spec.get("initContainers"))
        for index, init in enumerate(spec.get("initContainers") or []):
            name = f"{pod.container}-init{index}"
            self._run_container(name, pod, namespace, spec, init, shared=shared)
            finished = self.docker.api.wait(name, timeout=120)
            output = self.docker.api.logs(name)
            self.docker.api.remove_container(name, force=True)
            if finished["StatusCode"] != 0:
                raise RuntimeError(f"init container {init['name']} of {pod.name}: {output!r}")
        self._run_container(pod.container, pod, namespace, spec, container, shared=shared)

    def _mounts(
        self, pod: _Pod, namespace: str, spec: dict[str, Any], container: dict[str, Any],
        user: str, *, shared: bool,
    ) -> tuple[dict[str, str], list[str]]:  # fmt: skip
        """tmpfs mounts and bind mounts (``host:path[:ro]``) of ``container``'s volumeMounts."""
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        group = (spec.get("securityContext") or {}).get("fsGroup")
        tmpfs, binds = {}, []
        uid, gid = user.split(":")
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"], {})
            suffix = ":ro" if mount.get("readOnly") else ""
            if "secret" in volume:
                where = self._secret_volume(pod, namespace, mount["name"], volume["secret"], group)
                binds.append(f"{where}:{mount['mountPath']}{suffix}")
            elif "persistentVolumeClaim" in volume:
                where = self.claim_directory(
                    namespace, volume["persistentVolumeClaim"]["claimName"]
                )
                binds.append(f"{where}:{mount['mountPath']}{suffix}")
            elif "emptyDir" in volume and shared:
                where = self.volumes / pod.name / mount["name"]
                where.mkdir(parents=True, exist_ok=True)
                where.chmod(0o777)
                if sub := mount.get("subPath"):
                    where = where / sub  # made if missing, else left as the pod made it
                    where.mkdir(exist_ok=True)
                binds.append(f"{where}:{mount['mountPath']}{suffix}")
            else:
                tmpfs[mount["mountPath"]] = f"size=64m,uid={uid},gid={gid}"
        return tmpfs, binds

    def claim_directory(self, namespace: str, claim: str) -> Path:
        """Where a claim's data lives: a directory of its own, kept across its pods."""
        where = self.volumes / "claims" / namespace / claim
        if not where.exists():
            where.mkdir(parents=True)
            where.chmod(0o777)  # the volume's owner is the pod's fsGroup on a cluster
        return where

    def _secret_volume(
        self, pod: _Pod, namespace: str, name: str, source: dict[str, Any], group: int | None
    ) -> Path:
        where = self.volumes / pod.name / name
        if where.exists():
            return where
        where.mkdir(parents=True)
        where.chmod(0o755)
        self._secret_volumes[(pod.name, name)] = _SecretVolume(where, namespace, source, group)
        self._write_secret_volume(self._secret_volumes[(pod.name, name)])
        return where

    def _write_secret_volume(self, volume: _SecretVolume) -> None:
        """The Secret's files as the kubelet's atomic writer lays them out: in a new
        ``..<timestamp>`` directory, the ``..data`` link swapped to it in one rename, and
        each file a link through ``..data``; the previous set removed after."""
        secret = next(
            (
                s
                for s in self.server.live("v1/secrets")
                if s["metadata"].get("namespace") == volume.namespace
                and s["metadata"]["name"] == volume.source["secretName"]
            ),
            None,
        )
        if secret is None:
            if not volume.source.get("optional"):
                raise KeyError(f"secret {volume.namespace}/{volume.source['secretName']}")
            return
        version = str(secret["metadata"].get("resourceVersion"))
        if version == volume.version:
            return
        data = secret.get("data") or {}
        items = volume.source.get("items") or [{"key": k, "path": k} for k in data]
        mode = int(volume.source.get("defaultMode", 0o644))
        if volume.group is not None and mode & 0o400:
            mode |= 0o040  # the kubelet makes the files readable by fsGroup
        fresh = volume.where / f"..{time.time_ns()}"
        fresh.mkdir()
        fresh.chmod(0o755)
        for item in items:
            path = fresh / item["path"]
            path.write_bytes(base64.b64decode(data[item["key"]]))
            os.chown(path, 0, volume.group if volume.group is not None else 0)
            path.chmod(int(item.get("mode", mode)))
        link = volume.where / "..data"
        previous = os.readlink(link) if link.is_symlink() else None
        temporary = volume.where / "..data_tmp"
        temporary.symlink_to(fresh.name)
        temporary.replace(link)
        for item in items:
            entry = volume.where / item["path"]
            if not entry.is_symlink():
                entry.symlink_to(f"..data/{item['path']}")
        if previous is not None:
            shutil.rmtree(volume.where / previous, ignore_errors=True)
        volume.version = version

    def _refresh_secret_volumes(self) -> None:
        """A Secret that changed is written again into the pods that mount it (the kubelet
        does so within its sync period, about a minute; here at once)."""
        running = {pod.name for pod in self._all_pods()}
        for key, volume in list(self._secret_volumes.items()):
            if key[0] not in running:
                del self._secret_volumes[key]
            else:
                self._write_secret_volume(volume)

    def _run_container(
        self,
        name: str,
        pod: _Pod,
        namespace: str,
        spec: dict[str, Any],
        container: dict[str, Any],
        *,
        shared: bool = False,
    ) -> None:
        env = {}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
            elif ref := (item.get("valueFrom") or {}).get("secretKeyRef"):
                env[item["name"]] = self._secret(namespace, ref["name"], ref["key"])
            elif ref := (item.get("valueFrom") or {}).get("fieldRef"):
                env[item["name"]] = {
                    "metadata.name": pod.name, "metadata.namespace": namespace
                }.get(ref["fieldPath"], "")  # fmt: skip
        security = {
            **(spec.get("securityContext") or {}),
            **(container.get("securityContext") or {}),
        }
        user = f"{security.get('runAsUser', 65532)}:{security.get('runAsGroup', 65532)}"
        limits = (container.get("resources") or {}).get("limits") or {}
        tmpfs, binds = self._mounts(pod, namespace, spec, container, user, shared=shared)
        group = (spec.get("securityContext") or {}).get("fsGroup")
        self.docker.containers.run(
            container["image"],
            name=name,
            detach=True,
            entrypoint=container.get("command"),
            command=container.get("args"),
            environment=env,
            user=user,
            group_add=[str(group)] if group is not None else None,
            read_only=bool(security.get("readOnlyRootFilesystem")),
            cap_drop=["ALL"]
            if "ALL" in (security.get("capabilities") or {}).get("drop", [])
            else [],
            security_opt=["no-new-privileges"]
            if not security.get("allowPrivilegeEscalation", True)
            else [],
            mem_limit=quantity.Quantity(limits["memory"]).as_int() if "memory" in limits else None,
            nano_cpus=int(quantity.Quantity(limits["cpu"]).value * 1_000_000_000)
            if "cpu" in limits
            else None,
            tmpfs=tmpfs,
            volumes=binds or None,
            labels={KUBELET_LABEL: self.session},
        )

    def _secret(self, namespace: str, name: str, key: str) -> str:
        for secret in self.server.live("v1/secrets"):
            metadata = secret["metadata"]
            if metadata.get("namespace") == namespace and metadata["name"] == name:
                return base64.b64decode(secret["data"][key]).decode()
        raise KeyError(f"secret {namespace}/{name} has no {key}")

    async def _observe(self, pod: _Pod, deployment: dict[str, Any]) -> None:
        try:
            attrs = await asyncio.to_thread(self.docker.api.inspect_container, pod.container)
        except docker.errors.NotFound:
            return
        state = attrs["State"]
        pod.image_id, pod.container_id = attrs["Image"], attrs["Id"]
        address = attrs["NetworkSettings"]["IPAddress"] or None
        pod.address = address
        if state["Running"]:
            container_state: dict[str, Any] = {"running": {"startedAt": state["StartedAt"]}}
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            pod.ready = await self._probe(pod, container, address, paused=state["Paused"])
        else:
            await self._exited(pod, deployment, state)
            return
        await self._report(pod, deployment, container_state, address)

    async def _exited(self, pod: _Pod, deployment: dict[str, Any], state: dict[str, Any]) -> None:
        """An exited container: reported as waiting in CrashLoopBackOff with its last
        termination, then started again once its back-off has passed, with
        ``restartCount`` one more (as the kubelet counts: restarts made, not exits)."""
        now = asyncio.get_running_loop().time()
        if pod.restart_at is None:
            ran = _seconds_between(state["StartedAt"], state["FinishedAt"])
            if ran is not None and ran >= self.backoff.reset:
                pod.backoff_steps = 0
            pod.restart_at = now + self.backoff.delay(pod.backoff_steps)
            pod.last = {
                "terminated": {
                    "exitCode": state["ExitCode"],
                    "reason": "OOMKilled" if state["OOMKilled"] else "Error",
                    "startedAt": state["StartedAt"],
                    "finishedAt": state["FinishedAt"],
                    "containerID": f"docker://{pod.container_id}",
                }
            }
            pod.ready = False
        if now < pod.restart_at:
            waiting = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {self.backoff.delay(pod.backoff_steps):g}s "
                    f"restarting failed container={CONTAINER_NAME} pod={pod.name}",
                }
            }
            await self._report(pod, deployment, waiting, None)
            return
        await asyncio.to_thread(self.docker.api.start, pod.container)
        pod.restarts += 1
        pod.backoff_steps += 1
        pod.restart_at = None

    async def _report(
        self,
        pod: _Pod,
        deployment: dict[str, Any],
        container_state: dict[str, Any],
        address: str | None,
    ) -> None:
        status = {
            "phase": "Running",
            "podIP": address,
            "containerStatuses": [
                {
                    "name": CONTAINER_NAME,
                    "image": deployment["spec"]["template"]["spec"]["containers"][0]["image"],
                    "imageID": f"docker-pullable://{pod.image_id}",
                    "containerID": f"docker://{pod.container_id}",
                    "state": container_state,
                    "lastState": pod.last or {},
                    "restartCount": pod.restarts,
                    "ready": pod.ready,
                }
            ],
            "conditions": [{"type": "Ready", "status": "True" if pod.ready else "False"}],
        }
        if not address:
            del status["podIP"]
        await self._store_status(pod, status)

    async def _store_status(self, pod: _Pod, status: dict[str, Any]) -> None:
        """Write the pod's status (and its node) when either changed."""
        if status == pod.status:
            return
        pod.status = status
        current = next(
            (
                p
                for p in self.server.live(PODS)
                if p["metadata"]["name"] == pod.name and p["metadata"]["namespace"] == pod.namespace
            ),
            None,
        )
        if current is not None:
            current["status"] = status
            if pod.node:
                current["spec"] = {**current["spec"], "nodeName": pod.node}
            await self.server.store(PODS, current)

    async def _probe(
        self, pod: _Pod, container: dict[str, Any], address: str | None, *, paused: bool
    ) -> bool:
        """The readinessProbe's answer (httpGet), at most once per periodSeconds."""
        probe = container.get("readinessProbe")
        if probe is None or "httpGet" not in probe:
            return not paused  # no probe, or one not run here (grpc, exec): running is ready
        if address is None or paused:
            return False if paused else pod.ready  # a frozen process answers nothing
        loop = asyncio.get_running_loop()
        if loop.time() - pod.probed < float(probe.get("periodSeconds", 10)):
            return pod.ready
        pod.probed = loop.time()
        get = probe["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(
                p["containerPort"] for p in container.get("ports") or [] if p["name"] == port
            )
        url = f"http://{address}:{port}{get.get('path', '/')}"

        def ask() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=float(probe.get("timeoutSeconds", 1))):
                    return True
            except (urllib.error.URLError, OSError):
                return False

        return await asyncio.to_thread(ask)

    async def _endpoint_slices(self) -> None:
        """One EndpointSlice per Service with a selector, as the EndpointSlice controller keeps."""
        live = self.server.live(PODS)
        running = {
            (p["metadata"]["namespace"], p["metadata"]["name"]): p
            for p in live
            if (p.get("status") or {}).get("podIP")
        }
        seen = set()
        for service in self.server.live(SERVICES):
            selector = (service.get("spec") or {}).get("selector")
            if not selector:
                continue
            namespace, name = service["metadata"]["namespace"], service["metadata"]["name"]
            seen.add((namespace, name))
            members = [
                p
                for (ns, _), p in sorted(running.items())
                if ns == namespace
                and all(
                    (p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items()
                )
            ]
            endpoints = []
            for member in members:
                ready = any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in member["status"].get("conditions") or []
                )
                endpoints.append(
                    {
                        "addresses": [member["status"]["podIP"]],
                        "conditions": {"ready": ready, "serving": ready, "terminating": False},
                        "targetRef": {
                            "kind": "Pod",
                            "name": member["metadata"]["name"],
                            "namespace": namespace,
                        },
                    }
                )
            ports = []
            for port in service["spec"].get("ports") or []:
                target = port.get("targetPort", port["port"])
                if isinstance(target, str):
                    containers = members[0]["spec"]["containers"] if members else []
                    target = next(
                        (
                            p["containerPort"]
                            for c in containers
                            for p in c.get("ports") or []
                            if p.get("name") == target
                        ),
                        None,
                    )
                if target is not None:
                    ports.append({"name": port.get("name", ""), "port": target, "protocol": "TCP"})
            body = {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-stand-in",
                    "namespace": namespace,
                    "labels": {
                        SERVICE_NAME_LABEL: name,
                        "endpointslice.kubernetes.io/managed-by": "stand-in.blackhole.dev",
                    },
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            }
            if self._slices.get((namespace, name)) != body:
                self._slices[(namespace, name)] = copy.deepcopy(body)
                await self.server.store(ENDPOINT_SLICES, body)
        for namespace, name in list(self._slices):
            if (namespace, name) not in seen:
                del self._slices[(namespace, name)]
                await self.server.discard(ENDPOINT_SLICES, namespace, f"{name}-stand-in")

    async def _stop(self, pod: _Pod) -> None:
        def stop() -> None:
            try:
                self.docker.api.stop(pod.container, timeout=30)
                self.logs.mkdir(parents=True, exist_ok=True)
                (self.logs / f"{pod.namespace}-{pod.name}.log").write_bytes(
                    self.docker.api.logs(pod.container)
                )
                self.docker.api.remove_container(pod.container, force=True)
            except docker.errors.NotFound:
                pass

        await asyncio.to_thread(stop)
        await self.server.discard(PODS, pod.namespace, pod.name)

    def clean(self) -> None:
        for container in self.docker.containers.list(
            all=True, filters={"label": f"{KUBELET_LABEL}={self.session}"}
        ):
            container.remove(force=True)


@dataclass(frozen=True)
class Call:
    """One request as RBAC sees it."""

    verb: str
    group: str
    resource: str
    namespace: str | None


class Cluster:
    """The API server and kubelet above, served from a thread of their own."""

    def __init__(
        self,
        docker_client: docker.DockerClient,
        directory: Path,
        *,
        backoff: KubeletBackoff | None = None,
        nodes: tuple[str, ...] = ("node-a", "node-b"),
        pull_seconds: float = 0.0,
    ) -> None:
        self.backoff = backoff
        self.nodes = nodes
        self.pull_seconds = pull_seconds
        self.session = uuid.uuid4().hex[:8]
        self.docker = docker_client
        self.directory = directory
        self.loop = asyncio.new_event_loop()
        self.server: ApiServer | None = None
        self.kubelet: Kubelet | None = None
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def __enter__(self) -> Cluster:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the API server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        if self.kubelet is not None:
            self.kubelet.clean()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiServer() as server, kmock.Server(server) as http:
            self.server = server
            self.url = str(http.url).rstrip("/")
            self.kubelet = Kubelet(
                server,
                self.docker,
                self.session,
                self.directory / "pods",
                backoff=self.backoff,
                nodes=self.nodes,
                pull_seconds=self.pull_seconds,
            )
            task = asyncio.create_task(self.kubelet.run())
            self._ready.set()
            await self._stop.wait()
            task.cancel()
            for pods in list(self.kubelet.pods.values()):
                for pod in pods:
                    await self.kubelet._stop(pod)

    def kubeconfig(self) -> Path:
        path = self.directory / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
            "current-context": "kmock",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def api(self) -> k8s_client.ApiClient:
        configuration = k8s_client.Configuration()
        configuration.host = self.url
        return k8s_client.ApiClient(configuration)

    def requests(self, agent_prefix: str = "") -> list[Call]:
        """Every request so far, as RBAC sees it, of clients whose User-Agent starts so."""
        assert self.server is not None
        seen = []
        for request in list(self.server):
            if request.resource is None:
                continue
            if not str(request.headers.get("User-Agent", "")).startswith(agent_prefix):
                continue
            if request.method == "GET":
                verb = "watch" if request.params.get("watch") == "true" else "list"
                verb = "get" if request.name and verb == "list" else verb
            else:
                verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[
                    request.method
                ]
            resource = str(request.resource.plural)
            if request.subresource:
                resource = f"{resource}/{request.subresource}"
            seen.append(Call(verb, request.resource.group or "", resource, request.namespace))
        return seen

    def expire_watches(self) -> None:
        assert self.server is not None
        self.call(self.server.expire())

    def writes(self) -> list[tuple[str, str]]:
        """Every write so far, in order: (path, body as text)."""
        assert self.server is not None
        return [
            (str(r.url.path), r.text or "")
            for r in list(self.server)
            if r.resource is not None and r.method != "GET"
        ]

    def writers(self) -> list[tuple[str, str]]:
        """(User-Agent, path) of every write so far."""
        assert self.server is not None
        return [
            (str(r.headers.get("User-Agent", "")), str(r.url.path))
            for r in list(self.server)
            if r.resource is not None and r.method != "GET"
        ]

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)


def plugins(api: k8s_client.ApiClient) -> k8s_client.CustomObjectsApi:
    return k8s_client.CustomObjectsApi(api)


def printer_columns(crd_path: Path) -> list[dict[str, Any]]:
    crd = yaml.safe_load(crd_path.read_text())
    return list(crd["spec"]["versions"][0]["additionalPrinterColumns"])


def json_path(obj: dict[str, Any], path: str) -> Any:
    """The value at a printer column's JSON path: ``.a.b``, with list filters such as
    ``.a[?(@.type=="Ready")].b`` (the first item that matches)."""
    value: Any = obj
    for part in re.findall(r"[^.\[]+|\[\?\(@\.[^)]*\)\]", path):
        if part.startswith("[?"):
            key, wanted = re.fullmatch(r'\[\?\(@\.(\w+)=="([^"]*)"\)\]', part).groups()  # type: ignore[union-attr]
            value = next((i for i in value or [] if i.get(key) == wanted), None)
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def iter_items(listing: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from listing.get("items") or []


__all__ = [
    "DEPLOYMENTS",
    "ENDPOINT_SLICES",
    "PODS",
    "SERVICES",
    "SERVICE_NAME_LABEL",
    "ApiServer",
    "Cluster",
    "json",
    "json_path",
    "matches",
    "printer_columns",
]
