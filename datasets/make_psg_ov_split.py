#!/usr/bin/env python
"""Write SPADE's fixed open-vocabulary split of PSG (datasets/splits/psg_ov_split.json).

PSG has no published base/novel split, so SPADE fixes one by a rule on names alone (no data):
sort the 56 predicates alphabetically and make every 4th one novel (sorted positions 3, 7, 11, ...:
14 novel, 42 base); do the same separately for the 80 thing classes (20 novel) and the 53 stuff
classes (13 novel). The split serves OvR (novel predicates), OvD (novel objects) and OvD+R (both);
filtering applies to training only. The written file is committed: re-running this script must
reproduce it byte for byte.

    python datasets/make_psg_ov_split.py [--out datasets/splits/psg_ov_split.json]
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "datasets", "splits", "psg_ov_split.json")
RULE = (
    "Fixed by name, not by data: within each list (predicates, thing classes, stuff classes) "
    "sorted alphabetically, the names at positions 3, 7, 11, ... (every 4th, 0-based) are novel; "
    "all others are base. Novel names are removed from training only."
)


def split_names(names, period: int = 4):
    ordered = sorted(names)
    novel = {n for i, n in enumerate(ordered) if i % period == period - 1}
    return [n for n in names if n not in novel], [n for n in names if n in novel]


def psg_ov_split() -> dict:
    sys.path.insert(0, ROOT)
    from spade.data.datasets.builtin import PSG_CLASSES

    base_things, novel_things = split_names(PSG_CLASSES["thing_classes"])
    base_stuff, novel_stuff = split_names(PSG_CLASSES["stuff_classes"])
    base_preds, novel_preds = split_names(PSG_CLASSES["predicate_classes"])
    return {
        "rule": RULE,
        "base_objects": base_things + base_stuff,
        "novel_objects": novel_things + novel_stuff,
        "base_predicates": base_preds,
        "novel_predicates": novel_preds,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    from spade.utils.io import atomic_write_json

    split = psg_ov_split()
    atomic_write_json(args.out, split, indent=1)
    print(
        f"wrote {args.out}: {len(split['novel_predicates'])} novel / "
        f"{len(split['base_predicates'])} base predicates, {len(split['novel_objects'])} novel / "
        f"{len(split['base_objects'])} base object classes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
