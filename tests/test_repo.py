"""The README's promises: CI runs exactly its test command."""

import re
from pathlib import Path

from conftest import ROOT


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = _bash_blocks(readme)[1].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_quick_start_uses_bundled_sample_data():
    main_job = _bash_blocks((ROOT / "README.md").read_text())[0]
    for path in re.findall(r"sample_data/\S+", main_job):
        assert (ROOT / path).is_file(), path


def test_no_import_cycles_between_advcli_modules():
    """Layers import downwards only (docs/architecture.md); function-level imports count too."""
    import ast

    root = Path(__file__).resolve().parents[1] / "advcli"
    graph = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
                deps.update(c for c in candidates if c != name)
        graph[name] = deps
    graph = {k: {d for d in v if d in graph} for k, v in graph.items()}

    def visit(node, stack):
        assert node not in stack, " -> ".join(stack[stack.index(node):] + [node])
        for dep in graph[node]:
            if dep.startswith(node + "."):  # a package importing its own submodules
                continue
            visit(dep, stack + [node])

    for module in graph:
        visit(module, [])


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert scope["effects"].shape[0] == scope["adata"].n_vars
    assert scope["cells"].obsm["X_advcli"].shape[0] == scope["cells"].n_obs
    assert (tmp_path / "confounder.pt").is_file()
