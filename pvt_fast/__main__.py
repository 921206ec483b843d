"""Command line: ``python -m pvt_fast profile --model pvt_v2_b2 --size 2048 --out DIR`` (also ``pvt-fast``)."""
import argparse
import sys


def _sizes(text):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 224,512,1024, got {text!r}")


def _parser():
    from pvt_fast import BACKENDS
    from pvt_fast.hosts.zoo import NAMES
    from pvt_fast.profile_setup import DTYPES, model_names

    parser = argparse.ArgumentParser(prog="python -m pvt_fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "profile", help="per-stage time, peak memory and FLOPs of a model at one resolution",
        description="Profile forward_pyramid per stage (time, peak memory, FLOPs, tokens N, keys M) for "
                    "pvt_fast's backend and a comparison backend; writes DIR/report.md, report.json, trace.json "
                    "and memory_time.png.")
    p.add_argument("--model", required=True, metavar="NAME",
                   help=f"one of {', '.join(model_names())}; or a host model accelerated in place with "
                        f"pvt_fast.accelerate and timed against itself untouched: {', '.join(NAMES)}")
    p.add_argument("--size", required=True, type=int, help="input height and width in pixels")
    p.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    p.add_argument("--dtype", default="fp32", help=f"one of {', '.join(DTYPES)} (default fp32)")
    p.add_argument("--backend", default="auto", help=f"auto or one of {', '.join(BACKENDS)} (default auto)")
    p.add_argument("--compare", default=None,
                   help=f"backend to compare with, one of {', '.join(BACKENDS)}, or 'none' (default reference); "
                        "for a host model 'plain' (the default) or 'none'")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: cuda when available)")
    p.add_argument("--sweep", type=_sizes, default=None, metavar="S1,S2,...",
                   help="resolutions of the memory/time plot (default 224, 512, 1024, ... up to --size)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed runs per point (default 10 on CUDA; on CPU 2 at --size, 1 elsewhere)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report, trace and plot")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    from pvt_fast.hosts.zoo import is_host_name
    from pvt_fast.profile_setup import ProfileArgumentError
    from pvt_fast.profiler import profile_model

    host = is_host_name(args.model)
    compare = None if args.compare == "none" else args.compare or ("plain" if host else "reference")
    try:
        if host:
            if args.sweep:
                raise ProfileArgumentError(f"--sweep is not available for host model {args.model!r}")
            from pvt_fast.hosts.profile import profile_host

            report = profile_host(args.model, args.size, args.out, batch=args.batch, dtype=args.dtype,
                                  backend=args.backend, compare=compare, device=args.device, repeat=args.repeat)
        else:
            report = profile_model(args.model, args.size, args.out, batch=args.batch, dtype=args.dtype,
                                   backend=args.backend, compare=compare, device=args.device, sweep=args.sweep,
                                   repeat=args.repeat)
    except ProfileArgumentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(report['files'])} files to {args.out}:")
    for path in report["files"]:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
