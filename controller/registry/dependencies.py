"""Dependency resolution: version ranges, a start order, cycles and conflicts with their chains.

:func:`resolve` picks, for every plugin reachable from what is asked for,
the highest version that satisfies every range asking for it (no
backtracking: a lower version is never tried to make room for another
plugin). :func:`start_order` orders plugins so that each starts after what
it depends on. Errors name the chain that causes them: the cycle
``a -> b -> c -> a``, or the two requirement paths whose ranges exclude each
other. The registry uses both for installs; the reconciler uses
:func:`find_cycle` on the declared specs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from controller.errors import BundleRefusedError
from controller.spec import models
from controller.spec.semver import Version, VersionRange


class Candidate(Protocol):
    """A version of a plugin that could be picked (a manifest, or a marketplace entry)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> Version: ...

    @property
    def requires(self) -> list[models.Dependency]: ...


@dataclass(frozen=True)
class Requirement:
    """A range asked for, and who asks: the chain from the root, e.g. ``a@1.0.0 -> b@2.0.0``."""

    wanted: VersionRange
    chain: tuple[str, ...] = ()

    def who(self) -> str:
        return " -> ".join(self.chain) if self.chain else "the request"


@dataclass
class _State:
    requirements: dict[str, list[Requirement]] = field(default_factory=dict)
    chosen: dict[str, Candidate] = field(default_factory=dict)


def resolve(
    asked: Sequence[tuple[str, VersionRange]],
    available: Callable[[str], Sequence[Candidate]],
) -> dict[str, Candidate]:
    """The version of each plugin to use: what ``asked`` names and everything it requires.

    Raises :class:`BundleRefusedError` with reason ``DependencyUnsatisfiable``
    (no version in a range), ``DependencyConflict`` (ranges that exclude each
    other) or ``DependencyCycle``.
    """
    state = _State()
    pending: list[str] = []
    for name, wanted in asked:
        state.requirements.setdefault(name, []).append(Requirement(wanted))
        pending.append(name)
    while pending:
        name = pending.pop(0)
        requirements = state.requirements[name]
        versions = list(available(name))
        fitting = [c for c in versions if all(r.wanted.matches(c.version) for r in requirements)]
        if not fitting:
            raise _unsatisfiable(name, requirements, versions)
        best = max(fitting, key=lambda c: c.version)
        if name in state.chosen and state.chosen[name].version == best.version:
            continue
        state.chosen[name] = best
        for dependency in best.requires:
            chain = (*_chain_to(name, state), f"{best.name}@{best.version}")
            state.requirements.setdefault(dependency.name, []).append(
                Requirement(dependency.version, chain)
            )
            pending.append(dependency.name)
    graph = {name: [d.name for d in c.requires] for name, c in state.chosen.items()}
    start_order(graph)  # raises on a cycle
    return state.chosen


def _chain_to(name: str, state: _State) -> tuple[str, ...]:
    """The chain of the first requirement that brought ``name`` in."""
    first = state.requirements[name][0]
    return first.chain


def _unsatisfiable(
    name: str, requirements: list[Requirement], versions: Sequence[Candidate]
) -> BundleRefusedError:
    known = ", ".join(str(v) for v in sorted(c.version for c in versions)) or "none"
    for requirement in requirements:
        if not any(requirement.wanted.matches(c.version) for c in versions):
            return BundleRefusedError(
                "DependencyUnsatisfiable",
                f"no version of {name} satisfies {requirement.wanted} (wanted by "
                f"{requirement.who()}); versions available: {known}",
            )
    for i, first in enumerate(requirements):
        for second in requirements[i + 1 :]:
            if not any(
                first.wanted.matches(c.version) and second.wanted.matches(c.version)
                for c in versions
            ):
                return BundleRefusedError(
                    "DependencyConflict",
                    f"{name}: {first.wanted} (wanted by {first.who()}) conflicts with "
                    f"{second.wanted} (wanted by {second.who()}); versions available: {known}",
                )
    shown = "; ".join(f"{r.wanted} (wanted by {r.who()})" for r in requirements)
    return BundleRefusedError(
        "DependencyConflict",
        f"{name}: no version satisfies all of {shown}; versions available: {known}",
    )


def find_cycle(graph: Mapping[str, Sequence[str]], start: str | None = None) -> list[str] | None:
    """A cycle reachable from ``start`` (anywhere when None) as ``[a, b, c, a]``; else None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done:
            return None
        visiting.append(node)
        for child in sorted(graph.get(node, ())):
            found = visit(child)
            if found is not None:
                return found
        visiting.pop()
        done.add(node)
        return None

    for node in [start] if start is not None else sorted(graph):
        found = visit(node)
        if found is not None:
            return found
    return None


def start_order(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """The nodes of ``graph`` (node -> what it depends on), each after its dependencies.

    Ties are broken by name, so the order is stable. Raises
    :class:`BundleRefusedError` (``DependencyCycle``) with the cycle.
    """
    cycle = find_cycle(graph)
    if cycle is not None:
        raise BundleRefusedError(
            "DependencyCycle", f"dependency cycle: {' -> '.join(cycle)}; no start order exists"
        )
    order: list[str] = []
    placed: set[str] = set()

    def place(node: str) -> None:
        if node in placed:
            return
        for child in sorted(graph.get(node, ())):
            place(child)
        placed.add(node)
        order.append(node)

    for node in sorted(graph):
        place(node)
    return order
