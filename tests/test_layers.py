"""The package's layering rules that `lint-imports` cannot see (the import contracts are in pyproject.toml)."""

import ast
from pathlib import Path

import lorafit

PACKAGE = Path(lorafit.__file__).parent


def _function_level_imports() -> list[tuple[str, int, ast.stmt, str]]:
    """(file, line, import node, source line) for every import inside a function of the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        found.append((str(path.relative_to(PACKAGE)), sub.lineno, sub, lines[sub.lineno - 1]))
    return found


def _imports_lorafit(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "lorafit"
    return any(alias.name.split(".")[0] == "lorafit" for alias in node.names)


def test_no_module_but_the_cli_imports_lorafit_inside_a_function():
    """A function-level import of lorafit itself would hide a cycle or an upward import from the contracts. The CLI
    imports its commands' modules when they run, so that `lorafit --help` stays fast."""
    hidden = [f"{file}:{line}" for file, line, node, _ in _function_level_imports()
              if _imports_lorafit(node) and not file.startswith("cli/")]
    assert hidden == []


def test_every_function_level_import_of_a_library_says_why():
    """Allowed only for a heavy or optional dependency, with a comment saying so on the line."""
    silent = [f"{file}:{line}: {text.strip()}" for file, line, node, text in _function_level_imports()
              if not _imports_lorafit(node) and "#" not in text]
    assert silent == []


def test_the_core_names_no_quantization_format_no_cpu_trick_and_no_method():
    words = ("nf4", "int8", "gguf", "bitsandbytes", "rowsplit", "row_split", "mallopt", "houlsby", "mezo", "virtual")
    for path in (PACKAGE / "core").glob("*.py"):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines()).lower()
        assert not [word for word in words if word in code], path.name
