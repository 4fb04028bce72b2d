"""The project's import graph: no cycles, the library's packages in layers, the UNet factory free
of MLflow, and every DVC stage depending on all the code it runs (else changing that code would not
re-run the stage)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "commands")
LAYERS = ("core", "mitigation", "track", "train", "evaluate", "compare")  # pipeline's, each above the ones before


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports_of(name: str) -> set[str]:
    """Project modules that `name` imports anywhere in its file, function-level imports included
    (they run too, only later)."""
    found = set()
    for node in ast.walk(ast.parse(module_file(name).read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline import figures` imports the module pipeline.core.figures
            targets = [f"{node.module}.{a.name}" if module_file(f"{node.module}.{a.name}") else node.module
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in PACKAGES and module_file(t)}
    return found


def all_modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def closure(name: str) -> set[str]:
    """Every project module loaded by running `name`, with the packages above each."""
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))] + sorted(imports_of(m))
    return seen


def test_the_project_has_no_import_cycle():
    graph = {m: imports_of(m) for m in all_modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n):] + [n]) if n in path \
                else "import cycle through " + n
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_library_imports_no_command():
    """commands/ reads many experiments and sits above pipeline/, which must work without it."""
    upward = {m: sorted(n for n in imports_of(m) if n.split(".")[0] == "commands")
              for m in all_modules() if m.split(".")[0] == "pipeline"}
    assert not {m: found for m, found in upward.items() if found}


def test_importing_the_unet_factory_loads_no_mlflow():
    code = "import sys, pipeline.core.models; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _stages() -> dict[str, dict]:
    """name -> stage definition (a foreach stage's `do` block)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def test_each_package_of_the_library_imports_only_the_packages_below_it():
    """The layers dvc.yaml's dependencies are listed by: a stage that runs a package runs the ones
    below it, so a change to one re-runs exactly the stages above it."""
    modules = [m for m in all_modules() if m.startswith("pipeline.")]
    assert not [m for m in modules if m.split(".")[1] not in LAYERS], "a module of pipeline/ outside its layers"
    layer = {m: LAYERS.index(m.split(".")[1]) for m in modules}
    upward = {m: sorted(n for n in imports_of(m) if layer.get(n, -1) > layer[m]) for m in modules}
    assert not {m: found for m, found in upward.items() if found}


def test_every_stage_depends_on_all_the_code_it_runs():
    """By package (a folder) or file; pipeline/__init__.py, a docstring, is code no stage runs."""
    assert ast.get_docstring(tree := ast.parse((ROOT / "pipeline/__init__.py").read_text())) and len(tree.body) == 1
    for name, spec in _stages().items():
        module = re.search(r"-m (stages\.\w+)", spec["cmd"]).group(1)
        deps = [d for d in spec.get("deps", []) if isinstance(d, str)]
        missing = [str(module_file(m).relative_to(ROOT)) for m in sorted(closure(module) - {"pipeline"})
                   if not any(str(module_file(m).relative_to(ROOT)) == d
                              or module_file(m).is_relative_to(ROOT / d) and (ROOT / d).is_dir() for d in deps)]
        assert not missing, f"dvc.yaml: stage {name} runs {missing} without listing them in deps"


def test_no_stage_lists_code_it_does_not_run():
    """The converse, so deps stay exact: a listed .py file (or folder of them) is code the stage runs."""
    for name, spec in _stages().items():
        module = re.search(r"-m (stages\.\w+)", spec["cmd"]).group(1)
        files = {module_file(m) for m in closure(module)}
        listed = [d for d in spec.get("deps", []) if isinstance(d, str)]
        assert len(listed) == len(set(listed)), f"dvc.yaml: stage {name} lists a dependency twice"
        for d in (d for d in spec.get("deps", []) if isinstance(d, str) and d.split("/")[0] in PACKAGES):
            assert any(f == ROOT / d or f.is_relative_to(ROOT / d) for f in files), \
                f"dvc.yaml: stage {name} lists {d}, which it does not run"


@pytest.mark.parametrize("stage", ["iet_train", "iet_profile", "iet_finish"])
def test_the_iet_stages_depend_on_every_registered_mitigation(stage):
    """Mitigations are imported by name when a run uses them, which no import walk sees."""
    from pipeline.mitigation import REGISTRY

    deps = _stages()[stage]["deps"]
    for entry in REGISTRY.values():
        path = module_file(entry.hooks.split(":")[0])
        assert any(path == ROOT / d or path.is_relative_to(ROOT / d) for d in deps), \
            f"dvc.yaml: stage {stage} does not depend on {path.relative_to(ROOT)} ({entry.name})"
        assert issubclass(entry.load(), __import__("pipeline.mitigation.base", fromlist=["x"]).Mitigation)
