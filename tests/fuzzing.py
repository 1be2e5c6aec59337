"""Generated hostile inputs for every parser of outside input, and what each must end in.

Shared by the in-suite properties (``tests/unit/test_fuzz_inputs.py``, few
examples) and the long run (``bench/fuzz_inputs.py``, many). Each kind has a
hypothesis strategy and a ``run`` function that feeds one input to the
parser and returns ``"valid"`` or ``"refused"``; anything else it raises is a
defect.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from controller.errors import ControllerError
from controller.registry import bundle, manifest, policy, remote, signing
from controller.registry import registry as registry_module
from controller.spec import loader

from . import bundles

VALID_SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: kv-store
  labels: {team: storage}
spec:
  image: blackhole/example-storage:1.2.0
  version: 1.2.0
  resources: {cpu: 500m, memory: 128Mi, pids: 64}
  env: {LOG_LEVEL: debug}
  config: {size: 10, nested: {list: [1, 2, 3]}}
  volumes: [{name: data, mountPath: /data}]
  health: {periodSeconds: 5}
  state: {version: 2}
"""

VALID_MANIFEST = """\
name: kv-store
version: 1.2.0
description: A key-value store.
author: Blackhole
category: storage
provides: [storage.kv]
requires: [{name: auth, version: ^1}]
permissions: {network: none, volumes: [persistent], callPlugins: [auth]}
resources: {cpu: 500m, memory: 128Mi, pids: 64}
stateVersion: 2
protocolVersion: 1
image: blackhole/example-storage:1.2.0
"""

VALID_POLICY = """\
allowUnsigned: false
permissions: {networks: [none, private], egress: ["*.example.com:443"], volumes: [persistent]}
maxResources: {cpu: "2", memory: 1Gi, pids: 1024}
"""

# Fragments that broke parsers before: YAML syntax, tags, aliases, escapes, odd scalars.
HOSTILE = [
    "&a ",
    "*a",
    "&a [1, 2]",
    "!!int abc",
    "!!float x",
    "!!bool maybe",
    "!!binary aGVsbG8=",
    "!!timestamp 2024-13-01",
    "!!python/object/apply:os.system [id]",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "<<: {a: 1}",
    '"\\U99999999"',
    '"\\x00"',
    '"\\x07"',
    "\x00",
    "\x1b[31m",
    "\ud800",
    "2024-13-01",
    "2024-01-01T25:61:00Z",
    "1e99999",
    "9" * 5000,
    "0x",
    "0o9",
    "1:2:3",
    "? [1, 2]\n: x",
    "{[1]: 2}",
    "[" * 200,
    "]" * 3,
    "{" * 100,
    "- " * 100,
    ".nan",
    "-.inf",
    "~",
    "null",
    "yes",
    "''",
    '"',
    "'",
    "|",
    ">-",
    "%YAML 1.1\n---",
    "---",
    "...",
    "\n",
    "\t",
    "  ",
    ": ",
    "- ",
    "#",
    "12XB",
    "-1",
    "99999999999999999999",
    "é✓𝄞",
    "\ufeff",
]


def _mutated(base: str) -> st.SearchStrategy[str]:
    """``base`` with a few of its characters replaced, inserted or cut, often by HOSTILE ones."""
    fragment = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=20))

    @st.composite
    def build(draw: st.DrawFn) -> str:
        text = base
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(text)))
            cut = draw(st.integers(0, 8))
            text = text[:at] + draw(fragment) + text[at + cut :]
        return text

    return build()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(HOSTILE),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.sampled_from(HOSTILE), children, max_size=4)
    ),
    max_leaves=20,
)
"""Values any field might be given; dumped as YAML they become tags, quotes and escapes."""

python_values = st.one_of(
    json_values,
    st.dates().map(lambda d: d),
    st.datetimes(),
    st.binary(max_size=20),
    st.sets(st.integers(), max_size=3),
    st.tuples(st.integers(), st.text(max_size=5)),
)
"""Also what yaml.dump writes with non-JSON tags: timestamps, !!binary, !!set."""


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += _paths(value, (*prefix, index))
    return found


def _structured(base: str) -> st.SearchStrategy[str]:
    """The document ``base`` with some fields replaced by generated values, dumped as YAML."""
    document = yaml.safe_load(base)
    paths = _paths(document)

    @st.composite
    def build(draw: st.DrawFn) -> str:
        value = json.loads(json.dumps(document))
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            target = value
            for part in path[:-1]:
                if not isinstance(target, dict | list):
                    break
                try:
                    target = target[part]
                except (KeyError, IndexError, TypeError):
                    break
            else:
                if path and isinstance(target, dict | list):
                    with contextlib.suppress(IndexError, TypeError):
                        target[path[-1]] = draw(python_values)
        return str(yaml.dump(value, default_flow_style=draw(st.booleans()), allow_unicode=True))

    return build()


def _deep() -> st.SearchStrategy[str]:
    """Nesting, alias chains and sheer size: the inputs that cost time and memory."""
    nested = st.integers(1, 2000).map(lambda n: "config: " + "[" * n + "]" * n)
    aliases = st.integers(1, 9).map(alias_bomb)
    long = st.integers(1, 3).map(lambda n: "config: {a: " + "x" * (n << 20) + "}")
    return st.one_of(nested, aliases, long)


def alias_bomb(levels: int = 7) -> str:
    """A spec whose ``config`` holds ``levels`` levels of aliases, nine uses each: 9**levels
    strings once expanded, in a few hundred bytes."""
    lines = [
        "apiVersion: blackhole.dev/v1alpha1",
        "kind: Plugin",
        "metadata: {name: bomb}",
        "spec:",
        "  image: blackhole/example-echo:0.1.0",
        "  version: 0.1.0",
        "  config:",
        "    l0: &l0 [" + ",".join(['"' + "lol" * 7 + '"'] * 9) + "]",
    ]
    for level in range(1, levels + 1):
        lines.append(f"    l{level}: &l{level} [" + ",".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


spec_texts = st.one_of(_mutated(VALID_SPEC), _deep(), st.text(max_size=200))
spec_documents = _structured(VALID_SPEC)
manifest_texts = st.one_of(_mutated(VALID_MANIFEST), _structured(VALID_MANIFEST))
policy_texts = st.one_of(_mutated(VALID_POLICY), _structured(VALID_POLICY))


def run_spec(text: str) -> str:
    try:
        loader.load_text(text, "plugin.yaml")
    except ControllerError:
        return "refused"
    return "valid"


def run_manifest(text: str) -> str:
    try:
        manifest.parse(text.encode("utf-8", "surrogatepass"), "plugin.yaml")
    except ControllerError:
        return "refused"
    return "valid"


def run_policy(text: str) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "policy.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            policy.Policy.load(path)
        except ControllerError:
            return "refused"
    return "valid"


def run_index(data: bytes) -> str:
    import asyncio

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "index.json"
        path.write_bytes(data)
        try:
            asyncio.run(remote.fetch_index(str(path), Path(scratch) / "cache"))
        except ControllerError:
            return "refused"
    return "valid"


index_documents = st.one_of(
    st.builds(
        lambda entries: json.dumps(
            {"apiVersion": "blackhole.dev/v1alpha1", "kind": "PluginIndex", "plugins": entries}
        ).encode(),
        st.lists(
            st.dictionaries(
                st.sampled_from(
                    ["name", "version", "url", "sha256", "size", "provides", "requires"]
                ),
                json_values,
            ),
            max_size=3,
        ),
    ),
    st.binary(max_size=200),
    st.integers(1, 100_000).map(lambda n: b"[" * n),
)


# Bundles.


@dataclass(frozen=True)
class BundleFixture:
    """A directory with a trusted key, a valid signed bundle's parts, and a registry on it."""

    root: Path
    keys: bundles.Keys
    manifest_bytes: bytes
    signature: bytes
    image: bytes

    @classmethod
    def create(cls, root: Path) -> BundleFixture:
        keys = bundles.Keys(root / "keys", trust=root / "trusted")
        path = bundles.make_bundle(root, "kv", "1.0.0", key=keys.private)
        return cls(
            root,
            keys,
            bundles.read_member(path, bundle.MANIFEST),
            bundles.read_member(path, bundle.SIGNATURE),
            bundles.read_member(path, bundle.IMAGE),
        )

    def registry(self) -> registry_module.Registry:
        return registry_module.Registry(
            registry_module.Settings(self.root / "data", trust_dir=self.root / "trusted")
        )

    def valid(self) -> bytes:
        """The valid signed bundle, as a file's bytes."""
        return _tar(
            [
                (_info(bundle.MANIFEST, len(self.manifest_bytes)), self.manifest_bytes),
                (_info(bundle.SIGNATURE, len(self.signature)), self.signature),
                (_info(bundle.IMAGE, len(self.image)), self.image),
            ]
        )

    def signed(self, manifest_bytes: bytes) -> bytes:
        return signing.sign(manifest_bytes, signing.load_private(self.keys.private))


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def _info(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, kind, 0o644
    return info


def bundle_bytes(fixture: BundleFixture) -> st.SearchStrategy[bytes]:
    """Bundles built from a valid one's parts: members dropped, doubled, renamed, replaced,
    signed or not, with a damaged image; or the valid bundle with bytes overwritten."""
    valid = fixture.valid()
    names = st.sampled_from(
        [bundle.MANIFEST, bundle.SIGNATURE, bundle.IMAGE, "../x", "/etc/x", "a" * 200, "x"]
    )
    manifests = st.one_of(
        st.just(fixture.manifest_bytes),
        manifest_texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.binary(max_size=100),
    )

    @st.composite
    def assembled(draw: st.DrawFn) -> bytes:
        manifest_bytes = draw(manifests)
        signature = draw(st.sampled_from(["good", "stale", "none", "garbage"]))
        image = draw(st.one_of(st.just(fixture.image), _damaged(fixture.image)))
        members = [(_info(bundle.MANIFEST, len(manifest_bytes)), manifest_bytes)]
        if signature != "none":
            data = {
                "good": fixture.signed(manifest_bytes),
                "stale": fixture.signature,
                "garbage": draw(st.binary(max_size=50)),
            }[signature]
            members.append((_info(bundle.SIGNATURE, len(data)), data))
        members.append((_info(bundle.IMAGE, len(image)), image))
        if draw(st.booleans()):
            extra = draw(names)
            members.append((_info(extra, 3), b"abc"))
        return _tar(draw(st.permutations(members)))

    @st.composite
    def overwritten(draw: st.DrawFn) -> bytes:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(data) - 1))
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        return bytes(data[: len(valid)])

    return st.one_of(assembled(), overwritten(), st.just(sparse_bundle()), st.binary(max_size=600))


def _damaged(image: bytes) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(image)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        return bytes(data)

    return st.one_of(build(), st.binary(max_size=200), st.just(image[: len(image) // 2]))


def sparse_bundle(size: int = 20 << 30, member: str = bundle.MANIFEST) -> bytes:
    """A bundle of a few KB whose ``member`` is a GNU sparse file of ``size`` bytes: one byte
    of data at its end, the rest a hole that reading it would fill with zeros."""
    block = bytearray(_info(member, 1, tarfile.GNUTYPE_SPARSE).tobuf(tarfile.GNU_FORMAT))
    block[386:398] = b"%011o\0" % (size - 1)  # the sparse map's one entry: offset,
    block[398:410] = b"%011o\0" % 1  # and length
    block[483:495] = b"%011o\0" % size  # the member's real size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])
    other = bundle.IMAGE if member != bundle.IMAGE else bundle.MANIFEST
    rest = _tar([(_info(other, 3), b"abc")])
    return bytes(block[:512]) + b"x" + b"\0" * 511 + rest


def run_bundle(fixture: BundleFixture, data: bytes) -> str:
    """Open and check a bundle as an install does (loading nothing)."""
    path = fixture.root / "fuzzed.bundle"
    path.write_bytes(data)
    found = fixture.registry()
    try:
        with bundle.Bundle(path) as opened:
            found.check(opened)
    except ControllerError:
        return "refused"
    finally:
        found.close()
    return "valid"
