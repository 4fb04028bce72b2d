"""requirements.lock: the pinned versions `make` installs by default."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ @]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _lock() -> dict[str, str]:
    lines = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=\s]+", ln) for ln in lines), "every line name==version"
    return {_name(ln): ln.split("==")[1] for ln in lines}


def test_the_lock_pins_every_declared_dependency_and_leaves_torch_to_the_makefile():
    lock = _lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    wanted = {_name(r) for r in declared if "python_version >= '3.12'" not in r} - {"torch"}
    assert wanted - lock.keys() == set(), "declared but not pinned: run `make lock`"
    assert "torch" not in lock and not any(k.startswith("nvidia-") for k in lock)


def test_make_installs_with_the_lock_by_default():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK \?= requirements.lock$", makefile, re.M)
    assert '$(BIN)/pip install -q $(CONSTRAINTS) -e ".[dev]"' in makefile
