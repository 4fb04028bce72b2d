"""Where the duplicated images go in an IET run, and what AGC and MSR do with them (docs/history.md).

For one finished run (the files DVC versions; `dvc exp apply <name>` brings an experiment's):
  - shard composition: how the copies of each duplicated image are spread over the K shards, at the
    split and after each round's redistribution;
  - AGC: mean skip rate of duplicated and of unique samples per round, and of the images the
    baseline copies against the rest;
  - MSR: how many samples each round moved, and how many of them were copies of duplicated images.

    python docs/scripts/duplicate_diagnosis.py [RUN_DIR]     # default: the repository root
"""
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pipeline.compare.comparison import read_rows as rows  # numbers as floats
from pipeline.core.layout import Rounds


def main(root: Path) -> None:
    original = {int(r["sample_id"]): int(r["copy_of"]) for r in rows(root / "data/prepared/copy_of.csv")}
    group_of = lambda sid: original.get(sid, sid)  # noqa: E731 - a sample's image: its original's id
    duplicated = set(original.values())
    copied = {int(r["sample_id"]) for r in rows(root / "runs/eval/baseline/copied.csv") if int(r["copies"]) > 0}
    print(f"{len(duplicated)} duplicated images; the baseline copied {len(copied)} images, "
          f"{len(copied & duplicated)} of them duplicated")
    assignments = [("split", root / "runs/split/shards.csv")]
    rounds = Rounds(root / "runs/iet/rounds")
    assignments += [(f"after round {r}", rounds.profile(r) / "shards.csv") for r in range(1, rounds.complete() + 1)]
    for name, path in assignments:
        per_group = defaultdict(Counter)
        for r in rows(path):
            sid = int(r["sample_id"])
            if group_of(sid) in duplicated:
                per_group[group_of(sid)][int(r["shard"])] += 1
        spread = [sorted(c.values(), reverse=True) for c in per_group.values()]
        largest = [s[0] / sum(s) for s in spread]
        print(f"{name:16s} copies per shard, largest share of an image's copies in one shard: "
              f"mean {np.mean(largest):.2f} (max {max(largest):.2f}); e.g. {spread[0]}")
    for rnd in range(1, rounds.complete() + 1):
        r = rounds.profile(rnd)
        table = rows(r / "loss_table.csv")
        drawn = [t for t in table if t["drawn"] > 0]
        rate = lambda keep: np.mean([t["skip_rate"] for t in drawn if keep(t)])  # noqa: E731
        moves = rows(r / "moves.csv")
        moved_dup = sum(group_of(int(m["sample_id"])) in duplicated for m in moves)
        print(f"round {rnd}: skip rate duplicated {rate(lambda t: group_of(int(t['sample_id'])) in duplicated):.3f} "
              f"unique {rate(lambda t: group_of(int(t['sample_id'])) not in duplicated):.3f}; "
              f"copied-by-baseline {rate(lambda t: group_of(int(t['sample_id'])) in copied):.3f} "
              f"others {rate(lambda t: group_of(int(t['sample_id'])) not in copied):.3f}; "
              f"MSR moved {len(moves)} samples, {moved_dup} of them copies of duplicated images")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
