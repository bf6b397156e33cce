"""No import cycle among mae_fast's modules, counting imports inside functions too: a cycle that
works only because one side imports lazily is still two modules that cannot be read apart."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mae_fast"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the mae_fast modules it imports (``from . import x`` names submodule x when
    there is one, else the package; importing a.b.c also runs the packages a.b and a)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = ".".join(filter(None, (base, node.module)))
                else:
                    base = node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in paths]
                targets.update(subs or [base])
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        own = {t for t in targets if t in paths}
        # the packages above a target run first, except the ones this module is already inside
        own |= {t.rsplit(".", k)[0] for t in own for k in range(1, t.count(".") + 1)}
        graph[name] = {t for t in own if t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_sees_function_level_imports_and_cycles():
    graph = import_graph()
    assert "mae_fast.pretrain" in graph["mae_fast.cli"]  # imported inside build_parser
    assert "mae_fast.ops" in graph["mae_fast.profile"]  # through mae_fast.ops.embed
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)
