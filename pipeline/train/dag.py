"""The rounds as dvc.yaml lists them. DVC's templating has no arithmetic (a round's stage cannot
name round r-1 from r), so every round is an entry of its stages' `foreach`, and the one command
`iet-agc rounds N` writes those entries and iet.rounds together; `validate` refuses params whose
iet.rounds dvc.yaml does not list, before DVC deletes any output."""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.config import ConfigError
from pipeline.core.io import atomic_path
from pipeline.core.layout import Rounds

MODELS = ("baseline", "iet")
PER_MODEL = ("train", "profile")  # foreach over "1".."N"; `aggregate` over "<model>-<r>"


def entries(n: int) -> dict[str, dict]:
    """Every per-round family's foreach entries for `n` rounds."""
    out = {f"{m}_train": {str(r): {"after": "runs/pretrain" if r == 1 else f"runs/{m}/rounds/round_{r - 1}"}
                          for r in range(1, n + 1)} for m in MODELS}
    out.update({f"{m}_profile": {str(r): {"after": f"runs/{m}/rounds/round_{r}/train"} for r in range(1, n + 1)}
                for m in MODELS})
    out["aggregate"] = {f"{m}-{r}": {"model": m, "round": r} for m in MODELS for r in range(1, n + 1)}
    return out


def listed_rounds(stages: dict) -> dict[str, int]:
    """How many rounds each per-round family of dvc.yaml's `stages` lists."""
    return {name: len(stages[name]["foreach"]) for name in entries(1) if name in stages}


def check(dvc_yaml: Path, rounds: int) -> None:
    """One line when dvc.yaml's round stages are not those of `rounds` rounds."""
    import yaml

    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    want = {name: len(e) for name, e in entries(rounds).items()}
    if listed_rounds(stages) != {name: n for name, n in want.items() if name in stages}:
        listed = listed_rounds(stages).get("iet_train", "?")
        raise ConfigError(f"iet.rounds is {rounds} but {dvc_yaml} lists the stages of {listed} rounds: "
                          f"run `iet-agc rounds {rounds}` (it writes both), then run again")


def set_rounds(n: int, dvc_yaml: Path, params_yaml: Path) -> list[Path]:
    """Write `n` rounds into dvc.yaml's foreach entries and params.yaml's iet.rounds, as line edits
    (every comment and every other line stays as the user wrote it); remove round folders beyond
    `n` (left by a run of more rounds: never read, but in the hash of the folders that finish and
    evaluate depend on). Returns the folders removed."""
    import shutil

    text = Path(dvc_yaml).read_text()
    for name, listed in entries(n).items():
        text = _replace_foreach(text, name, [f"      {_flow(key)}: {_flow(item)}" for key, item in listed.items()])
    params = re.sub(r"(?m)^(iet:[^\n]*\n(?:(?:  [^\n]*|[ \t]*)\n)*?  rounds:[ \t]*)\d+", lambda m: f"{m.group(1)}{n}",
                    Path(params_yaml).read_text(), count=1)
    removed = [f for m in MODELS for f in Rounds(Path(dvc_yaml).parent / "runs" / m / "rounds").stale(n)]
    for path, content in ((dvc_yaml, text), (params_yaml, params)):
        with atomic_path(path) as tmp:
            tmp.write_text(content)
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def _replace_foreach(text: str, name: str, lines: list[str]) -> str:
    """dvc.yaml's text with the entries under stage `name`'s `foreach:` replaced by `lines`."""
    pattern = re.compile(rf"(?m)^(  {name}:[^\n]*\n    foreach:[^\n]*\n)((?:      [^\n]*\n)*)")
    if not pattern.search(text):
        raise ConfigError(f"dvc.yaml: no stage {name} with a foreach of rounds (restore it from git)")
    return pattern.sub(lambda m: m.group(1) + "".join(line + "\n" for line in lines), text, count=1)


def _flow(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return f'"{value}"' if value.isdigit() else value
