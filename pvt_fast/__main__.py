"""Command line: ``python -m pvt_fast profile ...`` and ``python -m pvt_fast check`` (also ``pvt-fast``)."""
import argparse
import os
import sys

DESCRIPTION = ("pvt_fast: profile a model per stage, or check the fused kernels against PyTorch on this GPU. "
               "Run 'COMMAND --help' for each command's options.")


def _sizes(text):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 224,512,1024, got {text!r}")


def _parser():
    from pvt_fast import BACKENDS
    from pvt_fast.hosts.zoo import NAMES
    from pvt_fast.profile_setup import DTYPES, model_names

    parser = argparse.ArgumentParser(prog=_prog(), description=DESCRIPTION)
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
    c = commands.add_parser(
        "check", help="run every fused op and model against its PyTorch composite on this CUDA device",
        description="Run every fused op (patch_embed, reduce_kv, reduce_kv_linear, attention, dwconv_gelu) "
                    "forward and backward, twice, against the sdpa composite on tiny odd shapes and every op "
                    "call of pvt_v2_b2 and pvt_v2_b2_li (224x224 batch 8, 1024x1024 batch 1) in fp32, fp16 and "
                    "bf16, then whole models (pvt_v2_b0, pvt_tiny, pvt_v2_b2_li) fused vs sdpa. The error "
                    "against a float64 reference may be at most twice the composite's own plus the dtype's "
                    "eps; runs must be bitwise equal. Exit status 0: all passed, 1: a check failed, 2: no CUDA "
                    "device (on the CPU only --quick runs, under TRITON_INTERPRET=1).")
    c.add_argument("--quick", action="store_true", help="tiny shapes and pvt_v2_b0 only")
    c.add_argument("--json", metavar="PATH", default=None, help="also write every row and the verdict to PATH")
    return parser


def _prog():
    """The name the user typed: the console script's, or the module form."""
    name = os.path.basename(sys.argv[0])
    return name if name.startswith("pvt-fast") else "python -m pvt_fast"


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "check":
        from pvt_fast import check

        return check.main(args)
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
