"""Time and peak CPU memory of SPADE's relation head vs object queries Q and pairs M.

Builds ``RGTRelationHead`` at the real-scale widths of ``Base-SPADE`` (query / relation width 256,
8 heads, 2 RGT_g layers, mask features 256 x h x w, CLIP text dim 768, 56 predicates) on random
inputs, and for each (Q, M) reports the median wall time of ``--repeats`` runs and the peak memory
allocated by torch during one run (from the profiler's CPU memory events, relative to the start of
the run). M = "all" means every ordered pair, Q (Q - 1), which is where PAIR_CHUNK bounds memory.

    OMP_NUM_THREADS=1 python benchmarks/bench_relation_head.py --queries 25 50 100 200 \
        --pairs 128 1024 all --train-pairs 128 1024 --out bench_relation_head.json

In training every selected pair's activations are kept for backward, so memory grows with M;
at inference pairs are scored PAIR_CHUNK at a time, so memory stops growing once M > PAIR_CHUNK.
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from spade.config import add_spade_config  # noqa: E402
from spade.modeling.relation import build_relation_head  # noqa: E402


def build_head(num_pairs: int, pair_chunk: int, mask_dim: int, text_dim: int) -> torch.nn.Module:
    """The relation head of the default config with the given M, PAIR_CHUNK and widths."""
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.MODEL.SPADE.PIXEL_DECODER.MASK_DIM = mask_dim
    cfg.MODEL.SPADE.RELATION.TEXT_DIM = text_dim
    cfg.MODEL.SPADE.RELATION.NUM_PAIRS = num_pairs
    cfg.MODEL.SPADE.RELATION.PAIR_CHUNK = pair_chunk
    torch.manual_seed(0)
    return build_relation_head(cfg)


def make_inputs(
    q: int, side: int, mask_dim: int, text_dim: int, num_predicates: int, seed: int = 0
):
    """Random head inputs for one image: Q queries, side x side masks."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        query_features=torch.randn(1, q, 256, generator=gen),
        mask_logits=torch.randn(1, q, side, side, generator=gen) * 3,
        class_probs=torch.randn(1, q, 134, generator=gen).softmax(-1),
        features={"mask_features": torch.randn(1, mask_dim, side, side, generator=gen)},
        predicate_text=F.normalize(torch.randn(num_predicates, text_dim, generator=gen), dim=-1),
    )


def training_targets(q: int, num_relations: int = 6):
    """A few GT triplets over the first queries, matched one-to-one."""
    n = min(q, 8)
    rel = torch.tensor([[i % n, (i + 1) % n, i % 5] for i in range(num_relations)])
    return [{"gt_relations": rel}], [(torch.arange(n), torch.arange(n))]


def run_once(head, inputs, mode: str, q: int) -> None:
    if mode == "train":
        targets, matches = training_targets(q)
        losses = head(**inputs, targets=targets, matches=matches)
        sum(losses.values()).backward()
        head.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            head(**inputs)


def peak_memory_bytes(fn) -> int:
    """Peak of torch's CPU allocations during ``fn()``, relative to its start (profiler events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    deltas = sorted(
        (e["ts"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and "Bytes" in e.get("args", {})
    )
    total, peak = 0, 0
    for _, nbytes in deltas:
        total += nbytes
        peak = max(peak, total)
    return peak


def benchmark(args) -> List[Dict]:
    rows = []
    for mode in args.modes:
        for q in args.queries:
            wanted = args.pairs if mode == "eval" else args.train_pairs
            all_pairs = q * (q - 1)
            for m in sorted({all_pairs if a == "all" else min(int(a), all_pairs) for a in wanted}):
                head = build_head(m, args.pair_chunk, args.mask_dim, args.text_dim)
                head.train(mode == "train")
                inputs = make_inputs(q, args.side, args.mask_dim, args.text_dim, args.predicates)
                run_once(head, inputs, mode, q)  # warm-up
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    run_once(head, inputs, mode, q)
                    times.append(time.perf_counter() - start)
                peak = peak_memory_bytes(lambda: run_once(head, inputs, mode, q))
                row = {
                    "mode": mode,
                    "Q": q,
                    "M": m,
                    "pair_chunk": args.pair_chunk,
                    "time_ms": 1000 * statistics.median(times),
                    "peak_mib": peak / 2**20,
                }
                rows.append(row)
                print(
                    f"{mode:5s} Q={q:4d} M={row['M']:6d} time {row['time_ms']:9.1f} ms  "
                    f"peak {row['peak_mib']:8.1f} MiB",
                    flush=True,
                )
    return rows


def _slope(x0: float, y0: float, x1: float, y1: float) -> float:
    """Log-log slope between two points (the exponent of a power law through them)."""
    return math.log(max(y1, 1e-6) / max(y0, 1e-6)) / math.log(x1 / x0)


def growth_summary(rows: List[Dict]) -> List[str]:
    """Power-law exponents of time and peak memory vs M (fixed Q) and vs Q (fixed M)."""
    lines = []
    for mode in sorted({r["mode"] for r in rows}):
        sub = [r for r in rows if r["mode"] == mode]
        for q in sorted({r["Q"] for r in sub}):
            pts = sorted((r["M"], r["time_ms"], r["peak_mib"]) for r in sub if r["Q"] == q)
            (m0, t0, p0), (m1, t1, p1) = pts[0], pts[-1]
            if m1 != m0:
                lines.append(
                    f"{mode}: Q={q}: time ~ M^{_slope(m0, t0, m1, t1):.2f}, "
                    f"peak ~ M^{_slope(m0, p0, m1, p1):.2f} (M {m0} -> {m1})"
                )
        for m in sorted({r["M"] for r in sub}):
            pts = sorted((r["Q"], r["time_ms"], r["peak_mib"]) for r in sub if r["M"] == m)
            (q0, t0, p0), (q1, t1, p1) = pts[0], pts[-1]
            if len(pts) >= 2 and q1 != q0:
                lines.append(
                    f"{mode}: M={m}: time ~ Q^{_slope(q0, t0, q1, t1):.2f}, "
                    f"peak ~ Q^{_slope(q0, p0, q1, p1):.2f} (Q {q0} -> {q1})"
                )
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=["128", "1024", "all"],
        help="M values at inference, or 'all' (every ordered pair)",
    )
    parser.add_argument(
        "--train-pairs",
        nargs="+",
        default=["128", "1024"],
        help="M values in training (all pairs are kept for backward)",
    )
    parser.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    parser.add_argument("--pair-chunk", type=int, default=4096)
    parser.add_argument(
        "--side", type=int, default=64, help="mask / mask-feature side (256 px / 4)"
    )
    parser.add_argument("--mask-dim", type=int, default=256)
    parser.add_argument("--text-dim", type=int, default=768)
    parser.add_argument("--predicates", type=int, default=56)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, side {args.side}, "
        f"PAIR_CHUNK {args.pair_chunk}"
    )
    rows = benchmark(args)
    print("\n| mode | Q | M | time (ms) | peak (MiB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['Q']} | {r['M']} | {r['time_ms']:.1f} | {r['peak_mib']:.1f} |")
    print("\n" + "\n".join(growth_summary(rows)))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
