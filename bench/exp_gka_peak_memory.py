"""Peak GPU memory of one GKA forward + backward on the suite's inputs, above what is allocated
before the step (GPU experiment; run 109). Prints one JSON line per shape and num_iter.

    GKA_KERNELS_AUTOTUNE=0 python -m bench.exp_gka_peak_memory train-4k,long-32k <tree label>
"""

import json
import os
import sys

import torch

from bench.cases import gka_chunk
from bench.shapes import SHAPES


def main() -> None:
    rows = []
    for shape in sys.argv[1].split(","):
        for num_iter in (30, 10):
            step, leaves = gka_chunk("ours", SHAPES[shape], "fwdbwd", num_iter=num_iter)
            step()
            torch.cuda.synchronize()
            for t in leaves:
                t.grad = None
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            rows.append({"shape": shape, "num_iter": num_iter, "peak_above_inputs_MiB": round(peak / 2**20, 1),
                         "side_stream": os.environ.get("GKA_KERNELS_SIDE_STREAM", "1"), "tree": sys.argv[2]})
            print(json.dumps(rows[-1]), flush=True)
            del step, leaves
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
