"""Issue 2's CPU target: pvt_v2_b2 forward, one process, same weights, the default backend against the
official math (pvt_fast's reference backend) and timm, best of R interleaved runs.

    python benchmarks/cpu_vs_official.py --size 1024 --threads 2 --repeats 5
"""
import argparse
import time

import timm
import torch
from timm.models.pvt_v2 import checkpoint_filter_fn

import pvt_fast
from pvt_fast.profile_report import relative_error


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pvt_v2_b2")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    official = pvt_fast.create_model(args.model, backend="reference").eval()
    default = pvt_fast.create_model(args.model).eval()
    default.load_state_dict(official.state_dict())
    other = timm.create_model(args.model).eval()
    other.load_state_dict(checkpoint_filter_fn(official.state_dict(), other))
    models = {"official-eager": official, f"pvt_fast ({default.backend})": default, "timm": other}
    x = torch.randn(args.batch, 3, args.size, args.size)
    best = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        want = official(x)
        for name, model in models.items():
            err = relative_error([model(x)], [want])
            print(f"{name:>20}: max |diff| / max |official| = {err:.2e}")
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                best[name] = min(best[name], time.perf_counter() - start)
    fast = best[f"pvt_fast ({default.backend})"]
    for name, t in best.items():
        print(f"{name:>20}: {t:.3f} s   pvt_fast speed-up x{t / fast:.2f}")


if __name__ == "__main__":
    main()
