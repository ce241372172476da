"""CUDA GKA decode at small batches: CTAs per head (``GKA_KERNELS_GKA_DECODE_SPLIT``) 1, 2 and
the automatic choice, against batch 1, 2, 4 and num_iter 1, 10, 30 (GPU experiment).

Each point is the suite's decode timing (``bench.cases.rotated_decode``: independent state sets
past L2, CUDA-graph replay). The sweep runs ``--rounds`` times, settings interleaved, so drift of a
shared card shows as round-to-round spread. Prints one JSON object.

    python -m bench.exp_gka_decode_split [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os

from bench.cases import gka_decode, rotated_decode
from bench.shapes import Shape
from bench.timing import time_ms

SETTINGS = ["1", "2", "auto"]


def time_point(batch: int, num_iter: int, split: str) -> float:
    """Median GPU microseconds of one decode step at this batch, num_iter and split setting."""
    os.environ["GKA_KERNELS_GKA_DECODE_SPLIT"] = split  # read at launch, frozen into the graph
    sh = Shape(f"decode-b{batch}", batch=batch, tokens=1)
    fn, _ = rotated_decode(gka_decode, "gka", "ours-cuda", sh, "decode", {"num_iter": num_iter})
    ms, method = time_ms(fn, graph=True)
    assert method == "cudagraph", method
    return ms * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.exp_gka_decode_split", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="1,2,4")
    p.add_argument("--iters", default="1,10,30")
    args = p.parse_args(argv)
    rows = []
    for rnd in range(args.rounds):
        for batch in map(int, args.batches.split(",")):
            for num_iter in map(int, args.iters.split(",")):
                for split in SETTINGS:
                    us = time_point(batch, num_iter, split)
                    rows.append({"round": rnd, "batch": batch, "num_iter": num_iter, "split": split, "us": us})
                    print(f"round {rnd} B={batch} num_iter={num_iter} split={split}: {us:.2f} us", flush=True)
    os.environ.pop("GKA_KERNELS_GKA_DECODE_SPLIT", None)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
