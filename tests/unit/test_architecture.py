"""The house's plan: every module of `agent/` lives in a room, rooms import only downwards, and
no imports go round in a circle (also inside a room, also through imports inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"

# The rooms, lowest first. A module may import from its own room and from rooms of lower layers;
# rooms of one layer know nothing of each other. `agent` is the package itself (its version).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("agent",),
    ("core",),  # pure logic and formats: generation ids, manifest, retention, archive, ...
    ("config",),  # every setting declared once, parsing per role
    ("monitoring",),  # metrics, status page, pings, notifications: read the state jobs record
    ("runtime",),  # steps, interrupts, lock, logging, alerts, cron, the job runner
    ("stores", "swap", "quiesce"),  # where generations are kept; the restore swap; 1.a/1.c
    ("chunks",),  # the deduplicated data format: packs, indexes, build, restore, gc
    ("source", "sink", "recovery"),  # the agents' jobs: steps 1-2 push, 2 pull-3, restore/verify
    ("cli",),  # parses and dispatches
    ("__main__",),
)
LAYER_OF = {room: index for index, rooms in enumerate(LAYERS) for room in rooms}


def module_name(path: Path) -> str:
    parts = ("agent", *path.relative_to(AGENT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(AGENT.rglob("*.py"))}


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "agent"


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The agent modules `path` imports, wherever in the file (functions, TYPE_CHECKING)."""
    found = set()
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    + ([base] if base else [])
                )
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {name for name in found if name in known}


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    return {module: imports(path, known) - {module} for module, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def forbidden(edges: dict[str, set[str]]) -> list[str]:
    """Every import from a room into a room of the same or a higher layer."""
    wrong = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            source_room, target_room = room_of(module), room_of(target)
            if source_room != target_room and LAYER_OF[target_room] >= LAYER_OF[source_room]:
                wrong.append(f"{module} ({source_room}) imports {target} ({target_room})")
    return wrong


def test_every_module_lives_in_a_declared_room():
    unknown = sorted({room_of(m) for m in modules()} - set(LAYER_OF))
    assert not unknown, f"rooms not declared in LAYERS: {unknown}"


def test_no_import_circles():
    assert circles(graph(modules())) == []


def test_rooms_import_only_downwards():
    assert forbidden(graph(modules())) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    """The quiescer's old circle (the factory imports a mode, the mode imports the record back
    from the factory's module), and step 1 importing restore."""
    edges = {
        "agent.quiesce.quiescer": {"agent.quiesce.signal"},
        "agent.quiesce.signal": {"agent.quiesce.quiescer"},
        "agent.source.backup": {"agent.recovery.restore"},
        "agent.recovery.restore": {"agent.quiesce.quiescer"},
        "agent.core.manifest": {"agent.config"},
        "agent.config": set(),
    }
    assert circles(edges) == [["agent.quiesce.quiescer", "agent.quiesce.signal"]]
    assert forbidden(edges) == [
        "agent.core.manifest (core) imports agent.config (config)",
        "agent.source.backup (source) imports agent.recovery.restore (recovery)",
    ]
