"""Pydantic models of the ``Plugin`` object: its metadata, spec and status.

These models are the single source of truth for the spec format: the CRD's
schema (:mod:`controller.spec.crd`) is generated from them, and every spec,
whether read from a file or from the Kubernetes API, is validated by them.
Field names are camelCase on the wire and snake_case in Python.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import urllib.parse
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controller.spec.quantity import Quantity
from controller.spec.semver import Version, VersionRange

API_GROUP = "blackhole.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "Plugin"
LABEL_PREFIX = f"{API_GROUP}/"
"""Labels under this prefix belong to the controller; users may not set them."""

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS1123_LABEL_RE = re.compile(DNS1123_LABEL)
CAPABILITY = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
HOST_PORT = r"^(\*\.)?[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?:[0-9]{1,5}$"
# A Docker/OCI image reference: [registry[:port]/]path[:tag][@digest].
IMAGE_REFERENCE = (
    r"^(?:[a-zA-Z0-9][a-zA-Z0-9.-]*(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)
_LABEL_KEY_RE = re.compile(
    r"^(?:(?P<prefix>[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)/)?"
    r"(?P<name>[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$"
)
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")

DnsLabel = Annotated[str, Field(pattern=DNS1123_LABEL, min_length=1, max_length=63)]
"""A DNS-1123 label: lower-case letters, digits and '-', starting and ending alphanumeric."""


class Model(BaseModel):
    """Base of every spec model (and of the registry's manifests, indexes and policy):
    unknown fields are errors, camelCase on the wire."""

    model_config = ConfigDict(
        extra="forbid",
        validate_by_alias=True,
        validate_by_name=True,
        serialize_by_alias=True,
        use_attribute_docstrings=True,
    )


class NetworkMode(StrEnum):
    """How much network a plugin gets."""

    NONE = "none"
    EGRESS = "egress"
    PRIVATE = "private"


class RuntimeName(StrEnum):
    """The runtimes a plugin can run on."""

    PROCESS = "process"
    DOCKER = "docker"
    PODMAN = "podman"
    KUBERNETES = "kubernetes"


class Phase(StrEnum):
    """Where a plugin is in its life, as the controller last saw it."""

    PENDING = "Pending"
    RUNNING = "Running"
    SWAPPING = "Swapping"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class Color(StrEnum):
    """The two slots a plugin's instances run in, for blue/green swaps."""

    BLUE = "blue"
    GREEN = "green"


class ObjectMeta(Model):
    """Standard object metadata: the name identifies the plugin."""

    name: DnsLabel
    """The plugin's name, unique per namespace: a DNS-1123 label (lower-case letters,
    digits and '-', at most 63 characters), because it becomes part of instance,
    network and volume names."""
    namespace: DnsLabel | None = None
    """The Kubernetes namespace; ignored by the single-host controller."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels copied to the plugin's instances. Keys under blackhole.dev/ are reserved
    for the controller."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Free-form annotations, not interpreted by the controller."""
    generation: int | None = Field(default=None, ge=0)
    """Set by the API server (or the file source): bumped on every change of spec."""
    uid: str | None = None
    """Set by the API server."""
    resource_version: str | None = Field(default=None, alias="resourceVersion")
    """Set by the API server."""
    creation_timestamp: datetime | None = Field(default=None, alias="creationTimestamp")
    """Set by the API server."""
    deletion_timestamp: datetime | None = Field(default=None, alias="deletionTimestamp")
    """Set by the API server when the object is being deleted."""
    finalizers: list[str] = Field(default_factory=list)
    """Set by the controller while it still has to clean up."""
    owner_references: list[dict[str, Any]] = Field(default_factory=list, alias="ownerReferences")
    """Set by the API server or other controllers."""
    managed_fields: list[dict[str, Any]] = Field(default_factory=list, alias="managedFields")
    """Set by the API server for server-side apply."""

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            match = _LABEL_KEY_RE.match(key)
            if match is None or len(match["name"]) > 63 or len(key) > 253:
                raise ValueError(
                    f'label key "{key}" is invalid; use [prefix/]name, the name at most 63 '
                    "characters of letters, digits, '-', '_' and '.'"
                )
            if key.startswith(LABEL_PREFIX) or match["prefix"] == API_GROUP:
                raise ValueError(
                    f'label key "{key}" is reserved: keys under {LABEL_PREFIX} are set '
                    "by the controller only"
                )
            if len(value) > 63 or not _LABEL_VALUE_RE.match(value):
                raise ValueError(
                    f'label "{key}" has invalid value "{value}"; use at most 63 letters, '
                    "digits, '-', '_' and '.', starting and ending alphanumeric"
                )
        return labels


class Permissions(Model):
    """What the plugin may reach. Must stay within what its manifest asks for."""

    network: NetworkMode = NetworkMode.NONE
    """none: no network at all, reached only over its Unix socket (the default);
    egress: a network of its own, outbound only to the hosts in egress;
    private: a network shared only with the plugins named in peers."""
    egress: list[Annotated[str, Field(pattern=HOST_PORT)]] = Field(default_factory=list)
    """host:port destinations the plugin may connect to, with network: egress
    (e.g. api.example.com:443; *.example.com:443 for any subdomain)."""
    peers: list[DnsLabel] = Field(default_factory=list)
    """Plugins sharing the private network, with network: private."""
    call_plugins: list[DnsLabel] = Field(default_factory=list, alias="callPlugins")
    """Plugins this plugin may call through the gateway."""

    @model_validator(mode="after")
    def _check_network(self) -> Self:
        if self.egress and self.network is not NetworkMode.EGRESS:
            raise ValueError(
                f"egress destinations are only allowed with network: egress "
                f"(network is {self.network.value})"
            )
        if self.peers and self.network is not NetworkMode.PRIVATE:
            raise ValueError(
                f"peers are only allowed with network: private (network is {self.network.value})"
            )
        if self.network is NetworkMode.PRIVATE and not self.peers:
            raise ValueError("network: private needs at least one plugin in peers")
        for field, items in (("egress", self.egress), ("peers", self.peers)):
            if len(set(items)) != len(items):
                raise ValueError(f"{field} lists an entry twice")
        for destination in self.egress:
            port = int(destination.rsplit(":", 1)[1])
            if not 1 <= port <= 65535:
                raise ValueError(f'egress "{destination}": port must be 1-65535')
        return self


class Resources(Model):
    """Resource limits of each instance. Always enforced: there is no unlimited."""

    cpu: Quantity = Field(default_factory=lambda: Quantity("500m"))
    """CPU limit in cores, as a Kubernetes quantity: "500m" or "0.5" is half a core.
    Default 500m; at least 10m."""
    memory: Quantity = Field(default_factory=lambda: Quantity("128Mi"))
    """Memory limit in bytes, as a Kubernetes quantity: "128Mi", "1Gi", "500M".
    Swap is not allowed beyond it. Default 128Mi; at least 6Mi."""
    pids: int = Field(default=64, ge=1, le=4_194_304)
    """Maximum number of processes and threads in the instance. Default 64."""
    start_cpu: Quantity | None = Field(default=None, alias="startCpu")
    """CPU limit while an instance starts, until its socket accepts: its imports are then not
    throttled by cpu, which it gets once its socket accepts. Default: the controller's
    (bhctl run --start-cpu, 2 cores). "0", or any value at or below cpu, turns the boost off.
    On Docker, Podman and processes; on Kubernetes instances start at cpu. Changing it
    replaces no running instance."""

    @field_validator("cpu")
    @classmethod
    def _check_cpu(cls, cpu: Quantity) -> Quantity:
        if cpu.value < 0:
            raise ValueError(f'"{cpu}" is negative; use a positive CPU amount such as "500m"')
        if cpu.as_millis() < 10:
            raise ValueError(f'"{cpu}" is below the minimum of 10m (0.01 cores)')
        return cpu

    @field_validator("start_cpu")
    @classmethod
    def _check_start_cpu(cls, cpu: Quantity | None) -> Quantity | None:
        if cpu is not None and cpu.value < 0:
            raise ValueError(f'"{cpu}" is negative; use "2" for two cores, "0" for no boost')
        return cpu

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, memory: Quantity) -> Quantity:
        if memory.value < 0:
            raise ValueError(f'"{memory}" is negative; use a positive amount such as "128Mi"')
        if memory.as_int() < 6 * 2**20:
            raise ValueError(f'"{memory}" is below the minimum of 6Mi that engines accept')
        return memory


def _clean_absolute_path(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f'{what} "{path}" must be an absolute path')
    if any(part == ".." for part in path.split("/")):
        raise ValueError(f'{what} "{path}" must not contain ".."')
    if "\x00" in path:
        raise ValueError(f"{what} must not contain NUL")
    return posixpath.normpath(path)


class Volume(Model):
    """A volume mounted into the plugin: a named volume (the default) or a host path."""

    name: DnsLabel
    """The volume's name, unique within the plugin."""
    mount_path: str = Field(alias="mountPath")
    """Absolute path inside the instance, without "..", e.g. /data."""
    size: Quantity | None = None
    """Requested size (a Kubernetes quantity, e.g. 1Gi); a PVC request on Kubernetes."""
    host_path: str | None = Field(default=None, alias="hostPath")
    """A host directory to mount instead of a named volume. Must lie under the
    controller's allowed host-path root; ".." is refused and symlinks that leave
    the root are refused when the instance starts."""
    read_only: bool = Field(default=False, alias="readOnly")
    """Mount read-only."""

    @field_validator("mount_path")
    @classmethod
    def _check_mount_path(cls, path: str) -> str:
        path = _clean_absolute_path(path, "mountPath")
        if path == "/":
            raise ValueError('mountPath "/" would hide the whole root filesystem')
        return path

    @field_validator("host_path")
    @classmethod
    def _check_host_path(cls, path: str | None) -> str | None:
        return None if path is None else _clean_absolute_path(path, "hostPath")

    @field_validator("size")
    @classmethod
    def _check_size(cls, size: Quantity | None) -> Quantity | None:
        if size is not None and size.value <= 0:
            raise ValueError(f'"{size}" must be positive, e.g. "1Gi"')
        return size


class Health(Model):
    """How the controller decides an instance is healthy."""

    period_seconds: int = Field(default=5, ge=1, le=3600, alias="periodSeconds")
    """Seconds between health checks. Default 5."""
    timeout_seconds: int = Field(default=1, ge=1, le=600, alias="timeoutSeconds")
    """Seconds a health check may take. Default 1."""
    failure_threshold: int = Field(default=3, ge=1, le=100, alias="failureThreshold")
    """Consecutive failed checks after which the instance is unhealthy. Default 3."""
    startup_deadline_seconds: int = Field(default=30, ge=1, le=3600, alias="startupDeadlineSeconds")
    """Seconds a new instance has to become Ready before it counts as failed. Default 30."""


class Restart(Model):
    """How crashed instances are restarted: exponential backoff, then a crash loop."""

    max_restarts: int = Field(default=5, ge=0, le=1000, alias="maxRestarts")
    """Restarts allowed within windowSeconds before the plugin is Degraded with reason
    CrashLoop. Default 5."""
    window_seconds: int = Field(default=300, ge=1, alias="windowSeconds")
    """The window over which restarts are counted. Default 300."""
    backoff_seconds: float = Field(default=1.0, gt=0, le=3600, alias="backoffSeconds")
    """Delay before the first restart; doubled after each further crash. Default 1."""
    max_backoff_seconds: float = Field(default=60.0, gt=0, le=86400, alias="maxBackoffSeconds")
    """Upper bound of the restart delay. Default 60."""

    @model_validator(mode="after")
    def _check_backoff(self) -> Self:
        if self.max_backoff_seconds < self.backoff_seconds:
            raise ValueError(
                f"maxBackoffSeconds ({self.max_backoff_seconds}) must not be below "
                f"backoffSeconds ({self.backoff_seconds})"
            )
        return self


class Check(Model):
    """A call made to the new version before it is promoted, and the answer it must give."""

    method: str = Field(min_length=1, max_length=256)
    """The method to call."""
    payload: Any = None
    """The payload, as JSON. Default: none."""
    expect: Any = None
    """What the answer must contain: equal values, or for objects, these keys with these
    values (others may be there too). Default: any answer that is not an error."""


METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})
"""Names of cloud metadata endpoints, refused as webhook hosts whatever they resolve to."""


def link_local(host: str) -> bool:
    """Whether ``host`` is a link-local address (169.254.0.0/16, fe80::/10, the cloud
    metadata endpoints 169.254.169.254 and fd00:ec2::254) or a metadata endpoint's name."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return host.lower().rstrip(".") in METADATA_HOSTS
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_link_local or address == ipaddress.ip_address("fd00:ec2::254")


class Webhook(Model):
    """An HTTP POST at a step of the swap (as Flagger's webhooks); see the swaps guide."""

    name: DnsLabel
    """The hook's name, unique among the plugin's hooks."""
    type: Literal["PrePromotion", "PostPromotion", "Rollback"]
    """PrePromotion: before the new version is promoted (after its checks). PostPromotion:
    when the scale-down window has passed, before the old version is removed. Rollback:
    after a swap rolled back, to tell."""
    url: str = Field(min_length=1, max_length=2048)
    """An http or https URL; link-local and metadata addresses are refused."""
    timeout_seconds: int = Field(default=10, ge=1, le=120, alias="timeoutSeconds")
    """Longest wait for one attempt's answer. Default 10."""
    retries: int = Field(default=2, ge=0, le=10)
    """Attempts after the first, for no connection, a timeout or a 5xx (a 4xx is an answer),
    with exponential backoff from 0.2 s. Default 2."""
    on_failure: Literal["Block", "RollBack", "Ignore"] | None = Field(
        default=None, alias="onFailure"
    )
    """What an answer that is not 2xx does. Block: the swap waits, asking again each
    health period (PrePromotion, PostPromotion; the default for PrePromotion). RollBack:
    the swap rolls back (the default for PostPromotion). Ignore: only an event (the only
    choice for Rollback, and its default)."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http or https URL; use e.g. https://host/path")
        if parts.username or parts.password:
            raise ValueError("credentials in the URL are refused; sign with --webhook-secret")
        if link_local(parts.hostname):
            raise ValueError(
                f"{parts.hostname} is a link-local or metadata address: refused, as for egress"
            )
        return url

    @model_validator(mode="after")
    def _check_on_failure(self) -> Self:
        if self.type == "Rollback" and self.on_failure not in (None, "Ignore"):
            raise ValueError("onFailure: a Rollback hook only tells; use Ignore (or leave it)")
        return self

    @property
    def failure(self) -> Literal["Block", "RollBack", "Ignore"]:
        """What a failure does (onFailure, or the type's default)."""
        if self.on_failure is not None:
            return self.on_failure
        return {"PrePromotion": "Block", "PostPromotion": "RollBack"}.get(  # type: ignore[return-value]
            self.type, "Ignore"
        )


HEADER_NAME = r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$"


class PrometheusQuery(Model):
    """A PromQL query whose result (a scalar, or a vector of one sample) is the measurement."""

    query: str = Field(min_length=1, max_length=8192)
    """The query, sent to the address given to the controller (bhctl run --prometheus-url).
    {{plugin}}, {{namespace}}, {{color}} and {{version}} are replaced by the new color's."""


class Measurement(Model):
    """One metric an analysis measures, again and again, against its limits (as Argo's
    AnalysisTemplate metrics)."""

    name: DnsLabel
    """The measurement's name, unique among the plugin's; steps and phases name it."""
    builtin: (
        Literal["SuccessRate", "ErrorCount", "Calls", "LatencyP50", "LatencyP90", "LatencyP99"]
        | None
    ) = None
    """What the gateway counts of the new color's calls over each interval: SuccessRate
    (answered calls that were not a 5xx, 0 to 1), ErrorCount (5xx), Calls, LatencyP50,
    LatencyP90, LatencyP99 (seconds). An interval without calls is Inconclusive (the
    analysis waits for calls)."""
    prometheus: PrometheusQuery | None = None
    """A Prometheus query instead of a builtin."""
    min: float | None = None
    """The least value that passes."""
    max: float | None = None
    """The greatest value that passes."""
    interval_seconds: int = Field(default=10, ge=1, le=3600, alias="intervalSeconds")
    """Seconds between measurements. Default 10."""
    count: int = Field(default=3, ge=1, le=1000)
    """Measurements to take; the analysis passes once they are all taken within the
    failure limit. Default 3."""
    failure_limit: int = Field(default=0, ge=0, le=1000, alias="failureLimit")
    """Measurements that may fail (out of limits, or a query error) before the analysis
    fails and the swap rolls back. Default 0."""

    @model_validator(mode="after")
    def _check_source(self) -> Self:
        if (self.builtin is None) == (self.prometheus is None):
            raise ValueError(f"analysis {self.name}: give builtin or prometheus, one of them")
        if self.min is None and self.max is None:
            raise ValueError(f"analysis {self.name}: give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"analysis {self.name}: min {self.min} is above max {self.max}")
        return self

    def passes(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    @property
    def limits(self) -> str:
        """The limits as said in messages, e.g. ">= 0.95"."""
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return " and ".join(parts)


class Pause(Model):
    """A canary step that waits."""

    duration_seconds: int | None = Field(default=None, ge=0, le=86400, alias="durationSeconds")
    """Seconds to wait. Default: until bhctl swap promote."""


class AnalysisStep(Model):
    """A canary step that measures the new color, at the weight set so far."""

    metrics: list[DnsLabel] = Field(default_factory=list, max_length=16)
    """The names of the measurements of hotSwap.analysis to take. Default: all of them."""


class CanaryStep(Model):
    """One step of a canary, as Argo's: exactly one of setWeight, pause and analysis."""

    set_weight: int | None = Field(default=None, ge=0, le=100, alias="setWeight")
    """The share of calls, in percent, the new color takes from now on."""
    pause: Pause | None = None
    """Wait for durationSeconds, or until bhctl swap promote."""
    analysis: AnalysisStep | None = None
    """Measure the new color; a failed analysis rolls the swap back."""

    @model_validator(mode="after")
    def _check_one(self) -> Self:
        given = [f for f in ("set_weight", "pause", "analysis") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("a canary step is exactly one of setWeight, pause and analysis")
        return self

    @property
    def kind(self) -> str:
        if self.set_weight is not None:
            return f"setWeight {self.set_weight}"
        if self.pause is not None:
            duration = self.pause.duration_seconds
            return "pause" + (f" {duration}s" if duration is not None else " until promoted")
        assert self.analysis is not None
        return "analysis " + (", ".join(self.analysis.metrics) or "(all)")


class Canary(Model):
    """How a canary moves calls to the new color, step by step."""

    steps: list[CanaryStep] = Field(min_length=1, max_length=64)
    """The steps, in order; after the last the new color is promoted (all calls)."""
    sticky_header: str | None = Field(default=None, pattern=HEADER_NAME, alias="stickyHeader")
    """A request header (gRPC: metadata key) whose value picks the color: calls with the
    same value go to the same color at a given weight (a hash of the value). Calls
    without it are split at random. Default: every call at random."""


class HotSwap(Model):
    """How a running plugin is moved to a new version, image, config or state version."""

    strategy: Literal["BlueGreen", "Recreate", "Canary"] = "BlueGreen"
    """BlueGreen: start the new version beside the old, move state and traffic, then stop
    the old (the default). Recreate: stop the old, then start the new. Canary (stateless
    plugins only): start the new version beside the old and move calls to it by weight,
    as canary.steps say."""
    auto_promote: bool = Field(default=True, alias="autoPromote")
    """Promote the new version as soon as it is Ready and its checks pass. With false,
    wait for `bhctl swap promote`. Default true."""
    max_pause_milliseconds: int = Field(default=200, ge=1, le=60_000, alias="maxPauseMilliseconds")
    """Longest time calls may be held at the flip; longer rolls back. Default 200: a
    pre-copy swap holds calls for about 5 ms at any state size on a quiet 2-core host and
    up to about 80 ms at its 99th percentile with a CPU hog beside it (bench/hotswap.py);
    a whole copy under the hold takes about 40 ms a MB."""
    drain_timeout_seconds: int = Field(default=30, ge=0, le=3600, alias="drainTimeoutSeconds")
    """Longest wait for the old version's in-flight calls to finish. Default 30."""
    scale_down_delay_seconds: int = Field(default=30, ge=0, le=86400, alias="scaleDownDelaySeconds")
    """Seconds the old version is kept after promotion, for instant rollback. Default 30."""
    checks: list[Check] = Field(default_factory=list)
    """Calls the new version must answer as expected before it is promoted."""
    state_transfer: Literal["PreCopy", "FullCopy"] = Field(default="PreCopy", alias="stateTransfer")
    """How state moves to the new version. PreCopy (the default): copied while the old
    version still serves, then only what changed since is moved while calls are held,
    so the pause does not grow with the state (needs plugins that keep revisions, such
    as the SDK's StatefulPlugin; others get FullCopy). FullCopy: the whole state is
    moved while calls are held."""
    pre_copy_rounds: int = Field(default=4, ge=1, le=32, alias="preCopyRounds")
    """Most copy rounds before calls are held (the first copies everything, the next
    ones what changed meanwhile). Default 4."""
    pre_copy_target_bytes: int = Field(
        default=256 * 1024, ge=0, le=1 << 30, alias="preCopyTargetBytes"
    )
    """Changes small enough to move while calls are held: the rounds stop once what
    changed during the last one is at most this many bytes. Default 262144."""
    webhooks: list[Webhook] = Field(default_factory=list, max_length=16)
    """HTTP POSTs at the swap's steps, signed when the controller has --webhook-secret."""
    canary: Canary | None = None
    """The steps of a Canary swap (needed with strategy Canary, refused with others)."""
    analysis: list[Measurement] = Field(default_factory=list, max_length=16)
    """Measurements of the new color that canary analysis steps, prePromotionAnalysis and
    postPromotionAnalysis name."""
    pre_promotion_analysis: list[DnsLabel] = Field(
        default_factory=list, max_length=16, alias="prePromotionAnalysis"
    )
    """Measurements taken before promotion (BlueGreen: of preview calls), which must pass
    for the swap to be promoted."""
    post_promotion_analysis: list[DnsLabel] = Field(
        default_factory=list, max_length=16, alias="postPromotionAnalysis"
    )
    """Measurements taken after promotion, within the scale-down window (the old color is
    kept until they pass, however long the window is); a failure rolls back."""

    @field_validator("webhooks")
    @classmethod
    def _unique_hooks(cls, hooks: list[Webhook]) -> list[Webhook]:
        names = [h.name for h in hooks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"webhook names must be unique: {', '.join(twice)} more than once")
        return hooks

    @model_validator(mode="after")
    def _check_canary(self) -> Self:
        if self.strategy == "Canary" and self.canary is None:
            raise ValueError("strategy Canary needs canary.steps")
        if self.strategy != "Canary" and self.canary is not None:
            raise ValueError(f"canary is for strategy Canary, not {self.strategy}")
        names = [m.name for m in self.analysis]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"analysis names must be unique: {', '.join(twice)} more than once")
        named = [*self.pre_promotion_analysis, *self.post_promotion_analysis]
        for step in self.canary.steps if self.canary else []:
            named += step.analysis.metrics if step.analysis else []
        unknown = sorted(set(named) - set(names))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: no such measurement in hotSwap.analysis")
        if self.canary and any(s.analysis for s in self.canary.steps) and not names:
            raise ValueError("a canary analysis step needs measurements in hotSwap.analysis")
        return self

    def measurements(self, names: list[str]) -> list[Measurement]:
        """The measurements ``names`` name (none named: all of them)."""
        return [m for m in self.analysis if not names or m.name in names]


class ProcessSource(Model):
    """Where the process runtime finds the plugin's code: a directory (or an unpacked bundle)."""

    path: str = Field(min_length=1, max_length=4096)
    """The plugin's directory: relative to the controller's plugin root (bhctl run
    --plugin-root), or an absolute path under it; ".." is refused."""
    entrypoint: str = Field(default="plugin.py", min_length=1, max_length=4096)
    """The Python file that serves the plugin, relative to path. Default plugin.py."""
    virtualenv: str | None = None
    """A virtual environment, relative to path, whose bin/python runs the plugin (its
    packages, the SDK among them, must be installed in it). Default: the controller's
    own Python, which has the SDK already imported, so the plugin starts in milliseconds."""
    python_path: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list, alias="pythonPath"
    )
    """Directories, relative to path, put in front of the plugin's sys.path."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        return _clean_path(path, "path")

    @field_validator("entrypoint", "virtualenv")
    @classmethod
    def _check_relative(cls, path: str | None) -> str | None:
        return None if path is None else _clean_relative_path(path, "a path inside the plugin")

    @field_validator("python_path")
    @classmethod
    def _check_python_path(cls, paths: list[str]) -> list[str]:
        return [_clean_relative_path(p, "pythonPath") for p in paths]


def _clean_path(path: str, what: str) -> str:
    if any(part == ".." for part in path.split("/")):
        raise ValueError(f'{what} "{path}" must not contain ".."')
    if "\x00" in path:
        raise ValueError(f"{what} must not contain NUL")
    return posixpath.normpath(path)


def _clean_relative_path(path: str, what: str) -> str:
    if path.startswith("/"):
        raise ValueError(f'{what} "{path}" must be relative to the plugin\'s path')
    return _clean_path(path, what)


class RateLimit(Model):
    """A token bucket: calls beyond it are answered 429 with Retry-After."""

    calls_per_second: float = Field(gt=0, le=1_000_000, alias="callsPerSecond")
    """Calls per second admitted on average."""
    burst: int = Field(default=0, ge=0, le=1_000_000)
    """Calls admitted at once above the rate. Default 0: the rate, rounded up."""


class Gateway(Model):
    """How the gateway admits calls to this plugin."""

    timeout_seconds: float = Field(default=30.0, gt=0, le=3600, alias="timeoutSeconds")
    """Longest a call may take; callers may ask for less (X-Timeout-Seconds), never more.
    Past it the caller gets 504. Default 30."""
    max_concurrent_calls: int = Field(default=64, ge=1, le=100_000, alias="maxConcurrentCalls")
    """Calls in flight at once; more are answered 429. Default 64."""
    rate_limit: RateLimit | None = Field(default=None, alias="rateLimit")
    """A token-bucket rate limit. Default: none."""
    max_request_bytes: Quantity = Field(
        default_factory=lambda: Quantity("1Mi"), alias="maxRequestBytes"
    )
    """Largest request body; larger is answered 413. Default 1Mi."""


class State(Model):
    """The plugin's state, carried over on a swap."""

    version: int = Field(ge=1)
    """The state schema version this image reads and writes; the SDK migrates older
    state up to it."""
    checkpoint_seconds: int = Field(default=10, ge=0, le=86400, alias="checkpointSeconds")
    """Seconds between checkpoints of the state into the controller's store (deltas
    between full ones); an instance restarted after a crash, an OOM kill or a removal
    gets the newest good checkpoint back before it is Ready, so at most this much of
    the writes is lost. 0: no checkpoints and no restores, for plugins that keep their
    state durably themselves (e.g. on a volume). Default 10."""


class Dependency(Model):
    """Another plugin that must be Ready before this one is."""

    name: DnsLabel
    """The plugin depended on."""
    version: VersionRange = Field(default_factory=lambda: VersionRange.parse("*"))
    """Versions of it that will do: comparators such as ">=1.0,<2", "^1.2", "~1.2.3",
    "1.x"; "||" between alternatives. Default "*" (any)."""


_HOSTNAME_RE = re.compile(
    r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*$"
)


class Remote(Model):
    """A plugin the controller does not run: reached at an address, over mutual TLS only."""

    address: str = Field(min_length=3, max_length=262)
    """Where it listens, HOST:PORT: a DNS name, an IPv4 address or an [IPv6] address,
    e.g. 10.0.3.2:7443 or kv.example.net:7443."""
    server_name: str | None = Field(default=None, alias="serverName", max_length=253)
    """The DNS name its certificate must carry in its SAN (its identity). Default
    <plugin>.<namespace>.<controller-id>.plugin.blackhole, the name the controller's CA
    certifies for this plugin (namespace "default" on one host)."""
    ca_file: str | None = Field(default=None, alias="caFile", max_length=4096)
    """An absolute path, on the controller's host, of the PEM CA certificate(s) its
    certificate must chain to. Default: the controller's CA (its own, or --ca-cert)."""

    @field_validator("address")
    @classmethod
    def _check_address(cls, address: str) -> str:
        host, colon, port = address.rpartition(":")
        if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(
                f'"{address}" is not HOST:PORT with a port 1-65535, e.g. 10.0.3.2:7443'
            )
        if host.startswith("[") and host.endswith("]"):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise ValueError(f'"{address}": {host} is not an IPv6 address') from None
        elif not _HOSTNAME_RE.match(host) or len(host) > 253:
            raise ValueError(
                f'"{address}": {host or "(nothing)"} is not a host name or an address; '
                "write an IPv6 address in brackets, e.g. [fd00::2]:7443"
            )
        return address

    @field_validator("server_name")
    @classmethod
    def _check_server_name(cls, name: str | None) -> str | None:
        if name is not None and not _HOSTNAME_RE.match(name):
            raise ValueError(f'"{name}" is not a DNS name, e.g. kv.plugins.example.net')
        return name

    @field_validator("ca_file")
    @classmethod
    def _check_ca_file(cls, path: str | None) -> str | None:
        if path is None:
            return None
        if not path.startswith("/"):
            raise ValueError(f'"{path}" must be an absolute path')
        return _clean_path(path, "caFile")


REMOTE_EXCLUDES = ("image", "bundle", "runtime", "process", "volumes", "env")
"""What a remote plugin's spec cannot have: the controller runs nothing of it."""


class PluginSpec(Model):
    """The desired state of a plugin: what runs, how isolated, how swapped."""

    image: str | None = Field(default=None, pattern=IMAGE_REFERENCE, max_length=512)
    """The container image, e.g. blackhole/example-storage:1.2.0, optionally pinned by
    @sha256 digest. Required unless bundle names a bundle, which then supplies it."""
    version: Version | None = None
    """The plugin's semantic version (MAJOR.MINOR.PATCH), e.g. 1.2.0. Required unless
    bundle names a bundle, which then supplies it."""
    bundle: str | None = Field(default=None, max_length=256)
    """A signed bundle from the controller's plugin registry, as NAME@RANGE (e.g.
    kv-store@^1.2; NAME alone for any version): the highest installed version in the
    range supplies image and version, after its signature, image digest, permissions,
    resources, protocol version and dependencies pass the operator's policy. When
    image or version are given too, they must agree with it."""
    runtime: RuntimeName | None = None
    """process, docker, podman or kubernetes. Default: the controller's runtime."""
    process: ProcessSource | None = None
    """Where the process runtime finds the plugin's code (its directory and entrypoint);
    needed on the process runtime, unused by the others (they run image)."""
    remote: Remote | None = None
    """A plugin the controller does not run, reached at an address over mutual TLS: its
    health is checked, calls are routed to it and swaps move its state to the next address.
    Excludes image, bundle, runtime, process, volumes and env; resources and restarts do
    not apply to it."""
    provides: list[Annotated[str, Field(pattern=CAPABILITY)]] = Field(default_factory=list)
    """Capabilities the plugin offers, searchable in the registry, e.g. storage.kv."""
    permissions: Permissions = Field(default_factory=Permissions)
    """What the plugin may reach. Default: no network, no calls to other plugins."""
    resources: Resources = Field(default_factory=Resources)
    """Limits of each instance. Default: cpu 500m, memory 128Mi, pids 64."""
    volumes: list[Volume] = Field(default_factory=list)
    """Volumes to mount. The root filesystem is read-only; /tmp is always a tmpfs."""
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = Field(default_factory=dict)
    """Environment variables. Names starting with BLACKHOLE_ are reserved."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Free-form configuration handed to the plugin's Initialize call."""
    health: Health = Field(default_factory=Health)
    """Health checking."""
    restart: Restart = Field(default_factory=Restart)
    """Restart policy for crashed instances."""
    hot_swap: HotSwap = Field(default_factory=HotSwap, alias="hotSwap")
    """How new versions replace the running one."""
    gateway: Gateway = Field(default_factory=Gateway)
    """How the gateway admits calls: timeout, concurrency, rate and size limits."""
    state: State | None = None
    """The plugin's state schema; omit for a stateless plugin (nothing is carried over)."""
    depends_on: list[Dependency] = Field(default_factory=list, alias="dependsOn")
    """Plugins that must be Ready first, with the versions that will do."""

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in env if k.upper().startswith("BLACKHOLE_"))
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)}: names starting with BLACKHOLE_ are reserved "
                "for the controller"
            )
        return env

    @field_validator("bundle")
    @classmethod
    def _check_bundle(cls, bundle: str | None) -> str | None:
        if bundle is not None:
            parse_bundle(bundle)
        return bundle

    @model_validator(mode="after")
    def _check_source(self) -> Self:
        if self.remote is not None:
            given = [name for name in REMOTE_EXCLUDES if getattr(self, name)]
            if given:
                raise ValueError(
                    f"remote: a plugin the controller does not run has no {', '.join(given)}; "
                    f"remove {'it' if len(given) == 1 else 'them'}, or remove remote to run "
                    "the plugin here"
                )
            if self.permissions != Permissions():
                raise ValueError(
                    "remote: permissions do not apply to a plugin the controller does not "
                    "run (its network is its host's, it has no gateway socket); remove them"
                )
            if self.version is None:
                raise ValueError("version required: the version the remote plugin runs")
            return self
        if self.bundle is None:
            missing = [f for f in ("image", "version") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"{' and '.join(missing)} required: name the image and version, "
                    'or a bundle of the registry (bundle: "NAME@RANGE")'
                )
        return self

    @field_validator("provides")
    @classmethod
    def _check_provides(cls, provides: list[str]) -> list[str]:
        if len(set(provides)) != len(provides):
            raise ValueError("a capability is listed twice")
        return provides

    @model_validator(mode="after")
    def _check_unique(self) -> Self:
        names = [v.name for v in self.volumes]
        paths = [v.mount_path for v in self.volumes]
        for what, items in (("name", names), ("mountPath", paths)):
            twice = sorted({i for i in items if items.count(i) > 1})
            if twice:
                raise ValueError(f"volumes: {what} {', '.join(twice)} used more than once")
        if "/tmp" in paths:
            raise ValueError("volumes: /tmp is always a private tmpfs; mount elsewhere")
        deps = [d.name for d in self.depends_on]
        twice = sorted({d for d in deps if deps.count(d) > 1})
        if twice:
            raise ValueError(f"dependsOn: {', '.join(twice)} listed more than once")
        return self

    @model_validator(mode="after")
    def _check_canary_stateless(self) -> Self:
        if self.hot_swap.strategy == "Canary" and self.state is not None:
            raise ValueError(
                "hotSwap.strategy Canary splits calls between two versions, each with its "
                "own state, and this plugin keeps state (spec.state): use BlueGreen (its "
                "prePromotionAnalysis measures the new version on preview calls)"
            )
        return self


def parse_bundle(text: str) -> tuple[str, VersionRange]:
    """``NAME@RANGE`` (or ``NAME``, any version) as the plugin's name and the versions that do."""
    name, at, wanted = text.strip().partition("@")
    if not _DNS1123_LABEL_RE.match(name) or len(name) > 63 or (at and not wanted.strip()):
        raise ValueError(
            f'"{text}" is not a bundle reference; use NAME@RANGE, e.g. "kv-store@^1.2", '
            "or NAME alone for any version"
        )
    return name, VersionRange.parse(wanted if at else "*")


class Condition(Model):
    """A condition in the shape of Kubernetes' metav1.Condition."""

    type: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$")
    """Ready, Progressing or Degraded."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    """A CamelCase word saying why, e.g. InstanceHealthy or CrashLoop."""
    message: str = Field(default="", max_length=32768)
    """A human-readable explanation."""
    last_transition_time: datetime = Field(alias="lastTransitionTime")
    """When status last changed."""
    observed_generation: int | None = Field(default=None, ge=0, alias="observedGeneration")
    """The generation of the spec this condition was computed from."""


class RemoteStatus(Model):
    """Where a remote plugin's instance is reached, and what the controller cannot do to it."""

    address: str
    """The address it is reached at (spec.remote.address when it was bound)."""
    server_name: str = Field(alias="serverName")
    """The name its certificate must carry."""
    not_applicable: list[str] = Field(default_factory=list, alias="notApplicable")
    """What the controller does to the instances it runs and cannot do to this one: resources
    (no limits applied), cgroupMetrics (no CPU, memory or OOM readings), processRestart (an
    unhealthy one is only probed again, nothing is restarted), logs (its output stays on its
    host)."""


class InstanceStatus(Model):
    """What one instance (one color) of the plugin is doing."""

    color: Color
    """blue or green."""
    version: str
    """The plugin version this instance runs."""
    state: str
    """The runtime's view: created, running, exited, ..."""
    restarts: int = Field(default=0, ge=0)
    """How often the controller restarted this instance."""
    ready: bool = False
    """Whether its health check passes."""
    last_exit_code: int | None = Field(default=None, alias="lastExitCode")
    """The exit code of its last crash, if any."""
    oom_killed: bool = Field(default=False, alias="oomKilled")
    """Whether its last crash was an out-of-memory kill."""
    start_cpu: str | None = Field(default=None, alias="startCpu", max_length=32)
    """The CPU it started with above its spec's (the start-up boost), e.g. "2"; it has its
    spec's cpu since its socket accepted. Unset when it started at its spec's cpu."""
    remote: RemoteStatus | None = None
    """Set for a remote plugin (spec.remote): its address and what does not apply to it."""


class SwapStep(StrEnum):
    """Where a swap in progress is."""

    STARTING = "Starting"
    """The new color is starting; the old one serves."""
    AWAITING_PROMOTION = "AwaitingPromotion"
    """The new color is Ready and passed its checks; waiting for bhctl swap promote."""
    ANALYZING = "Analyzing"
    """The new color is Ready and passed its checks; prePromotionAnalysis measures it."""
    CANARY = "Canary"
    """The new color takes the canary's share of calls while its steps go on."""
    PROMOTING = "Promoting"
    """Calls are held while state moves and the route flips."""
    PROMOTED = "Promoted"
    """The new color serves; the old one is kept until scaleDownDelaySeconds pass."""


class MeasurementResult(Model):
    """How one measurement of an analysis went so far."""

    name: str
    """The measurement (spec.hotSwap.analysis[].name)."""
    phase: Literal["Running", "Successful", "Failed"]
    """Running until count measurements are taken or more than failureLimit failed."""
    measured: int = Field(default=0, ge=0)
    """Measurements taken."""
    failures: int = Field(default=0, ge=0)
    """Measurements out of limits, or that could not be taken."""
    inconclusive: int = Field(default=0, ge=0)
    """Intervals without calls to measure (not counted)."""
    value: float | None = None
    """The last value measured."""
    failed_values: list[float | None] = Field(default_factory=list, alias="failedValues")
    """The values that failed (the last ten; none: it could not be taken)."""
    message: str | None = Field(default=None, max_length=4096)
    """What the last measurement found wrong, if anything."""
    at: datetime | None = None
    """When the last measurement was taken."""


class AnalysisRun(Model):
    """One analysis of a swap's new color: at a canary step, before or after promotion."""

    at: str
    """Where in the swap: PrePromotion, PostPromotion, or step N of a canary."""
    phase: Literal["Running", "Successful", "Failed", "Skipped"]
    """How it went (Skipped: bhctl swap promote went past it)."""
    started: datetime
    """When it began."""
    measurements: list[MeasurementResult] = Field(default_factory=list)
    """Each measurement's results."""


class SwapProgress(Model):
    """A swap in progress, persisted so that a restarted controller resumes or rolls it back."""

    step: SwapStep
    """Where it is."""
    from_color: Color = Field(alias="fromColor")
    """The color that served when it began."""
    to_color: Color = Field(alias="toColor")
    """The color being brought in."""
    from_version: str = Field(alias="fromVersion")
    """The version that served when it began."""
    from_hash: str = Field(default="", alias="fromHash")
    """The spec hash of the instance that served when it began."""
    to_version: str = Field(alias="toVersion")
    """The version being brought in."""
    to_hash: str = Field(alias="toHash")
    """The spec hash of the instance being brought in."""
    started: datetime
    """When it began."""
    promoted: datetime | None = None
    """When the route flipped to the new color."""
    canary_step: int | None = Field(default=None, ge=0, alias="canaryStep")
    """A canary's current step (0: the first of spec.hotSwap.canary.steps)."""
    weight: int | None = Field(default=None, ge=0, le=100)
    """The share of calls, in percent, a canary's new color takes."""
    step_started: datetime | None = Field(default=None, alias="stepStarted")
    """When the current canary step began."""
    analysis: AnalysisRun | None = None
    """The analysis running now."""
    analyses: list[AnalysisRun] = Field(default_factory=list)
    """The analyses of this swap that ended."""


class SwapStatus(Model):
    """The outcome of the last blue/green swap."""

    from_version: str = Field(alias="from")
    """The version swapped from."""
    to_version: str = Field(alias="to")
    """The version swapped to."""
    pause_milliseconds: float | None = Field(default=None, ge=0, alias="pauseMilliseconds")
    """How long calls were held at the flip."""
    result: Literal["Promoted", "RolledBack", "Aborted", "InProgress"]
    """How the swap ended."""
    to_hash: str | None = Field(default=None, alias="toHash")
    """The spec hash swapped to; a rolled-back hash is not tried again until the spec
    changes."""
    from_hash: str | None = Field(default=None, alias="fromHash")
    """The spec hash swapped from: what bhctl swap undo goes back to."""
    reason: str | None = None
    """Why it rolled back or was aborted, e.g. SwapFailedImport."""
    message: str | None = Field(default=None, max_length=32768)
    """What a rolled-back swap ran into, and what serves since."""
    time: datetime | None = None
    """When it ended."""
    generation: int | None = Field(default=None, ge=0)
    """The spec generation that rolled back: that spec is not tried again until the
    generation changes (any edit of the spec, its swap settings included) or bhctl swap
    retry."""
    state_bytes: int | None = Field(default=None, ge=0, alias="stateBytes")
    """Bytes of state moved in all."""
    held_state_bytes: int | None = Field(default=None, ge=0, alias="heldStateBytes")
    """Bytes of state moved while calls were held."""
    state_transfer: str | None = Field(default=None, alias="stateTransfer")
    """How the state moved: PreCopy (with the number of rounds) or FullCopy."""


class RestoreStatus(Model):
    """The checkpoint last restored into a restarted instance."""

    checkpoint: int
    """The snapshot id of the checkpoint (bhctl state history)."""
    revision: str = ""
    """The state revision restored."""
    taken: datetime
    """When the checkpoint was taken."""
    age_seconds: float = Field(ge=0, alias="ageSeconds")
    """How old it was when restored: writes of that span were lost."""
    time: datetime
    """When it was restored."""
    instance: str
    """The instance it was restored into."""


class PluginStatus(Model):
    """The observed state of a plugin. Written by the controller only."""

    phase: Phase = Phase.PENDING
    """Pending, Running, Swapping, Degraded or Failed."""
    observed_generation: int | None = Field(default=None, ge=0, alias="observedGeneration")
    """The generation of the spec the controller last acted on."""
    active_color: Color | None = Field(default=None, alias="activeColor")
    """The color receiving calls."""
    active_version: str | None = Field(default=None, alias="activeVersion")
    """The version receiving calls."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready, Progressing and Degraded."""
    instances: list[InstanceStatus] = Field(default_factory=list)
    """The plugin's instances, one per color that exists."""
    last_swap: SwapStatus | None = Field(default=None, alias="lastSwap")
    """The last blue/green swap."""
    swap: SwapProgress | None = None
    """The swap in progress, if any."""
    last_restore: RestoreStatus | None = Field(default=None, alias="lastRestore")
    """The checkpoint last restored after a crash, an OOM kill or a removal."""


class Plugin(Model):
    """A plugin: one isolated, health-checked, hot-swappable component run by the Blackhole
    controller."""

    api_version: Literal["blackhole.dev/v1alpha1"] = Field(alias="apiVersion")
    """The API version: blackhole.dev/v1alpha1."""
    kind: Literal["Plugin"]
    """The kind: Plugin."""
    metadata: ObjectMeta
    """Standard object metadata; metadata.name is the plugin's name."""
    spec: PluginSpec
    """The desired state."""
    status: PluginStatus | None = None
    """The observed state, written by the controller."""

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def key(self) -> str:
        """The work-queue key: ``name``, or ``namespace/name`` on Kubernetes."""
        ns = self.metadata.namespace
        return f"{ns}/{self.metadata.name}" if ns else self.metadata.name

    def to_document(self) -> dict[str, Any]:
        """The object as it is written in YAML or sent to Kubernetes."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
