"""The package's imports flow one way: no import cycle among spannorm's modules (counting the imports inside
functions, which would otherwise hide one), and an import inside a function says why on its line or the line
above (the CLI's start-up time, an optional dependency). No function is over 60 lines and no class over 200,
unless a comment at its top says why ("# long: ...")."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "spannorm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The spannorm modules an import statement imports (a name imported from a package may be a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "spannorm"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "spannorm":
        return []
    return [target] + [f"{target}.{a.name}" for a in node.names]


def says_why(lines: list[str], i: int) -> bool:
    """Whether import line ``i`` has a comment on it, or above the block of import lines it belongs to."""
    if "#" in lines[i]:
        return True
    while i > 0 and lines[i - 1].strip().startswith(("from ", "import ")):
        i -= 1
    return i > 0 and lines[i - 1].strip().startswith("#")


def graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """{module: the spannorm modules it imports}, and the function-level imports without a comment."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    silent = []
    for module, path in files.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        in_function = {
            id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            targets = [t for t in imported(node, module, path.name == "__init__.py") if t in files and t != module]
            edges[module] |= set(targets)
            if targets and id(node) in in_function and not says_why(lines, node.lineno - 1):
                silent.append((module, node.lineno, lines[node.lineno - 1].strip()))
    return edges, silent


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert says_why(["# why", "import a", "from b import c"], 2) and not says_why(["x = 1", "import a"], 1)
    assert imported(ast.parse("from ..model import LM").body[0], "spannorm.study.grid", False) == [
        "spannorm.model",
        "spannorm.model.LM",
    ]


def test_no_import_cycle():
    edges, _ = graph()
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_imports_inside_functions_say_why():
    _, silent = graph()
    assert silent == [], "\n".join(f"{m}:{line}: {text}" for m, line, text in silent)


FUNCTION_LINES, CLASS_LINES = 60, 200
LONG = "# long: "  # a comment at the top of a function or class (before its first statement) that says why


def says_why_long(lines: list[str], node: ast.AST) -> bool:
    """Whether a comment "# long: <why>" stands between the def/class line and its first statement after the
    docstring."""
    body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
    return any(line.strip().startswith(LONG) for line in lines[node.lineno - 1 : body[0].lineno - 1])


def too_long(source: str) -> list[tuple[str, int, int]]:
    """(name, line, lines) of each function over FUNCTION_LINES and class over CLASS_LINES that does not say why."""
    lines, found = source.splitlines(), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            n = node.end_lineno - node.lineno + 1
            limit = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
            if n > limit and not says_why_long(lines, node):
                found.append((node.name, node.lineno, n))
    return found


def test_the_length_check_can_fail():
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    assert too_long(f"def f():\n{body}\n") == [("f", 1, 61)]
    assert too_long(f'def f():\n    """Doc."""\n    # long: a table, one row a line\n{body}\n') == []
    assert too_long(f"def f():\n    x = 1\n    # long: too late, below its first statement\n{body}\n") != []


def test_no_long_function_or_class_without_a_reason():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name}: {n} lines"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, line, n in too_long(path.read_text())
    ]
    assert found == [], "\n".join(found)
