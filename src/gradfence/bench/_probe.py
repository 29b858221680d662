"""Child process of ``gradfence bench``: peak RSS of one configuration, on CPU.

``python -m gradfence.bench._probe --model SPEC --input SPEC --batch-size N --mode M
[--train-mode] --threads T`` builds the model and the input in this fresh process,
enters the configuration's scope, and measures one forward call with
:func:`gradfence.bench.measure.peak_rss`. Prints one JSON line:
``{"method": ..., "baseline_bytes": ..., "peak_bytes": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Measure one configuration and print the JSON line; exit status 1 on failure."""
    from gradfence.modes import BENCH_MODES

    parser = argparse.ArgumentParser(prog="python -m gradfence.bench._probe")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--mode", choices=BENCH_MODES, required=True)
    parser.add_argument("--train-mode", action="store_true")
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)

    import torch

    from gradfence.bench.measure import call, peak_rss, scope
    from gradfence.bench.workload import Workload
    from gradfence.errors import GradfenceError

    torch.set_num_threads(args.threads)
    try:
        workload = Workload(args.model, args.model, args.input)
        model = workload.build_model()
        model_input = workload.make_input(args.batch_size)
        with scope(model, args.mode, args.train_mode):
            peak = peak_rss(lambda: call(model, model_input))
    except GradfenceError as exc:
        print(f"gradfence bench probe: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "method": peak.method,
                "baseline_bytes": peak.baseline_bytes,
                "peak_bytes": peak.peak_bytes,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
