#!/usr/bin/python3
"""Interleaved A/B of training steps, or of generate() calls, through `bench --child` (experiments/bench.cpp).

On a shared machine a few-percent change drowns in the drift between whole
`make bench` runs. This runs the rows step by step instead: every round, each
(method, build) pair gets a fresh child process for a few steps, with the
order of the builds alternating from round to round. It reports the minimum
and the median ms/step per row, and each method's ratio to the same build's
step of the first method (full fine-tuning by default). The minimum is the
estimate least disturbed by other load.

  tools/ab_steps.py --builds old=/tmp/oldbuild/bin/bench,new=build/bin/bench \\
      --config small --threads 1 --rounds 4

--config takes one of bench's shapes (tools/bench_shapes.py); n is 16.
--kind generate times one generate() call per step instead (64 prompt + 64 new
tokens, --batch rows; --f16 with F16 weights), e.g. batch-1 decoding on GPT-2 small's shape:

  tools/ab_steps.py --builds old=/tmp/old/bench,new=build/bin/bench \
      --config gpt2 --kind generate --batch 1 --methods base --rounds 6
"""
import argparse
import json
import os
import statistics
import subprocess

from bench_shapes import CONFIGS


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--builds", required=True, help="name=path of a bench binary, comma-separated")
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--methods", default="full,prefix,lora,prompt",  # method-names: a user-overridable default
                    help="comma-separated; ratios are to the first one's step")
    ap.add_argument("--kind", default="train", choices=["train", "generate"])
    ap.add_argument("--batch", type=int, help="rows per step (default: the config's training batch)")
    ap.add_argument("--f16", action="store_true", help="generate with F16 weights (GPT::set_weights_f16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per child")
    args = ap.parse_args()

    builds = []
    for item in args.builds.split(","):
        name, sep, path = item.partition("=")
        if not sep or not os.access(path, os.X_OK):
            ap.error(f"--builds: '{item}' is not name=path of an executable bench")
        builds.append((name, path))
    if args.batch is not None and args.batch <= 0:
        ap.error(f"--batch: {args.batch} must be a positive number of rows")
    if args.f16 and args.kind != "generate":
        ap.error("--f16 needs --kind generate: F16 weights take no training step")
    methods = args.methods.split(",")
    if not all(methods) or len(set(methods)) != len(methods):
        ap.error(f"--methods: '{args.methods}' must name each method once")
    env = dict(os.environ, GOMP_SPINCOUNT=os.environ.get("GOMP_SPINCOUNT", "3000"))

    ms = {}
    for r in range(args.rounds):
        order = builds if r % 2 == 0 else builds[::-1]
        for m in methods:
            for name, path in order:
                shape = dict(CONFIGS[args.config])
                if args.batch is not None:
                    shape["batch"] = args.batch
                spec = dict(kind=args.kind, config=args.config, method=m, n=16, options={}, base_dir="",
                            prompt_len=64, new_tokens=64, warmup=1, threads=args.threads, f16=args.f16, **shape)
                child = subprocess.Popen([path, "--child", json.dumps(spec)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, env=env)
                json.loads(child.stdout.readline())  # {"ready": ...} after the warm-up step
                for _ in range(args.steps):
                    child.stdin.write("step\n")
                    child.stdin.flush()
                    ms.setdefault((m, name), []).append(json.loads(child.stdout.readline())["ms"])
                child.stdin.write("end\n")
                child.stdin.flush()
                child.stdout.readline()
                if child.wait() != 0:
                    raise SystemExit(f"{path} --child ({m}) exited with {child.returncode}")
        print(f"round {r + 1} of {args.rounds} done", flush=True)

    first = methods[0]  # the ratios' denominator
    print(f"| build | method | min ms | median ms | min / {first} min | median / {first} median |")
    print("|---|---|---:|---:|---:|---:|")
    for name, _ in builds:
        base = ms[(first, name)]
        for m in methods:
            xs = ms[(m, name)]
            print(f"| {name} | {m} | {min(xs):.1f} | {statistics.median(xs):.1f} | {min(xs) / min(base):.3f} | "
                  f"{statistics.median(xs) / statistics.median(base):.3f} |")


if __name__ == "__main__":
    main()
