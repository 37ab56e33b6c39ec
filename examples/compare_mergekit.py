"""Show that guardmerge's ties and linear merges equal mergekit's, tensor by tensor.

mergekit lives in its own virtual environment (it is not a guardmerge dependency):

    python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5
    python examples/compare_mergekit.py --mergekit /tmp/mk/bin/mergekit-yaml [--layers 2 --hidden 64]

Both tools merge the same base and classifiers: guardmerge does the HM3 expansion itself, and
mergekit gets the expanded copies (zero-padded heads, an all-zero base head) written out as
ordinary BertForSequenceClassification folders. Exits non-zero if a tensor differs by more
than the tolerance.
"""

from __future__ import annotations

import argparse
import sys

from guardmerge.tools.merge_bench import run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mergekit", required=True, help="path to mergekit-yaml")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--tolerance", type=float, default=1e-5)
    args = p.parse_args()
    results = run(layers=args.layers, hidden=args.hidden, methods=(), mergekit=args.mergekit,
                  density=args.density, compare=("ties", "linear"), repeat=1)
    ok = True
    for method in ("ties", "linear"):
        c = results[method]["compare"]
        good = c.get("equal_names") and c["max_abs_diff"] <= args.tolerance
        ok = ok and bool(good)
        print(f"{method}: {'EQUAL' if good else 'DIFFERENT'} within {args.tolerance:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
