"""`cffa` — synth | train | generate | evaluate | report | demo. Flags come from the jobs' config dataclasses.

Each command imports its job's modules when it runs (the imports inside the functions below): `cffa
--help` and a bad flag answer in a fraction of a second instead of loading torch, Ray and diffusers.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from cffa_ray import internals, stop_signals
from cffa_ray.errors import ConfigError, DataError, Interrupted, RunStopped, disk_full
from cffa_ray.evaluate.config import EvaluateConfig
from cffa_ray.faults import maybe_fail
from cffa_ray.flags import add_flags, from_namespace
from cffa_ray.generate.config import GenerateConfig
from cffa_ray.quiet import silenced, terminal
from cffa_ray.train.config import TrainConfig


def _synth(ns) -> int:
    from cffa_ray.checks import check_output_dir
    from cffa_ray.synth import write_synthetic_pairs

    check_output_dir(ns.out, "--out")
    stems = write_synthetic_pairs(ns.out, ns.pairs, ns.size, ns.seed)
    print(f"wrote {len(stems)} synthetic pairs ({ns.size}px) to {ns.out}/cf and {ns.out}/fa")
    return 0


def _train(ns) -> int:
    from cffa_ray.train.launch import train

    cfg = from_namespace(TrainConfig, ns)
    train(cfg)
    print(f"[cffa] done: run folder {cfg.run_dir} (best_checkpoint/, latest_checkpoints/, logs, samples)")
    return 0


def _generate(ns) -> int:
    from cffa_ray.generate.job import generate
    from cffa_ray.generate.outputs import resume_hint

    cfg = from_namespace(GenerateConfig, ns)
    try:
        generate(cfg)
    except (KeyboardInterrupt, SystemExit):  # Ray turns Ctrl-C inside its calls into SystemExit
        raise Interrupted(resume_hint(cfg.output_dir, cfg.num_samples)) from None
    return 0


def _evaluate(ns) -> int:
    from cffa_ray.evaluate.job import evaluate

    evaluate(from_namespace(EvaluateConfig, ns))
    return 0


def _report(ns) -> int:
    from cffa_ray.evaluation_report import is_evaluation, write_evaluation_report
    from cffa_ray.report import write_report

    if is_evaluation(ns.run_dir):
        print(f"[cffa] report: {write_evaluation_report(ns.run_dir)} (open it in a browser)")
        return 0
    path = write_report(ns.run_dir)
    print(f"[cffa] report: {path} (open it in a browser; the PNGs lie beside it)")
    return 0


def _demo(ns) -> int:
    from cffa_ray.checks import check_output_dir
    from cffa_ray.demo import run_demo

    check_output_dir(ns.out, "--out")
    run_demo(ns.out)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line (argparse would print the whole, long usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cffa", description="Paired colour-fundus / fluorescein-angiogram diffusion on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("synth", help="write synthetic registered CF/FA pairs (DIR/cf, DIR/fa)")
    p.add_argument("--out", required=True, help="output folder (required)")
    p.add_argument("--pairs", type=int, required=True, help="number of pairs (required)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="pair k depends only on (seed, k) (default: 0)")
    p.set_defaults(run=_synth)

    p = sub.add_parser("train", help="train LoRA(s) with Ray Train + DeepSpeed ZeRO")
    add_flags(p, TrainConfig)
    p.set_defaults(run=_train)

    p = sub.add_parser("generate", help="generate pairs with a Ray Data map_batches job (parquet + PNG shards)")
    add_flags(p, GenerateConfig)
    p.set_defaults(run=_generate)

    p = sub.add_parser("evaluate", help="score generated pairs against real ones: vessel alignment, SWD, "
                                        "FID/KID, SSIM/PSNR (Ray Data tasks)")
    add_flags(p, EvaluateConfig)
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("report", help="report.html of a training run (loss curves, preview pairs over steps) or "
                                      "of a `cffa evaluate` output (its numbers)")
    p.add_argument("run_dir", help="a run folder written by `cffa train` (<output_dir>/<name>), or the --output "
                                   "folder of `cffa evaluate`")
    p.set_defaults(run=_report)

    p = sub.add_parser("demo", help="synthetic pairs -> 2-worker ZeRO-2 training on the built-in tiny-retina "
                                    "model -> 32 generated pairs")
    p.add_argument("--out", default="demo", help="folder for everything the demo makes (default: demo)")
    p.set_defaults(run=_demo)
    return parser


OUTPUT_FLAGS = ("output_dir", "output", "out", "run_dir")  # where each command writes (report: RUN_DIR)


def no_space_message(ns, file: str) -> str:
    """The one line for a full disk: the folder it happened in (the file's, else the command's output)."""
    flag = next((f for f in OUTPUT_FLAGS if getattr(ns, f, None)), None)
    output = f"{'RUN_DIR' if flag == 'run_dir' else '--' + flag} {getattr(ns, flag)}" if flag else "its output folder"
    if file:
        where = f"no space left on the device of {os.path.dirname(file) or '.'} (writing {os.path.basename(file)})"
    else:
        where = f"no space left on device while writing to {output} (or a temporary folder)"
    return (f"{where}: free some space there, or give another {output.split(' ')[0]}; what was finished is "
            "kept, and a rerun goes on from it")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors that are the input's fault: one line, exit 2; a run stopped on an error
    that no retry heals: one line, exit 1; Ctrl-C: one line saying how to go on, exit 130, and the
    same for SIGTERM (exit 143) and SIGHUP (exit 129): see stop_signals.py."""

    ns = build_parser().parse_args(argv)
    try:
        stop_signals.install()  # inside the try: a signal right after it is one line too, not a traceback
        maybe_fail("command", 1)  # tests park the command here ("command=1,hold=FILE") to send it a signal
        with terminal():
            return ns.run(ns)
    except (ConfigError, DataError) as e:
        return last_line(ns, f"error: {e}", 2)
    except RunStopped as e:
        return last_line(ns, f"error: {e}", 1)
    except (Interrupted, KeyboardInterrupt) as e:
        hint = str(e) or f"{stop_signals.interrupted()}; rerun the same command to go on from where it stopped"
        return last_line(ns, hint, stop_signals.exit_code())
    except BaseException as e:
        if stop_signals.received() is not None:  # a stop signal that reached Ray's processes too can end
            return last_line(ns, f"{stop_signals.interrupted()}; rerun the same command to go on from where it "
                                 "stopped", stop_signals.exit_code())  # the run in any of their errors
        full = disk_full(e) if isinstance(e, Exception) else None
        if full is None:
            raise
        return last_line(ns, f"error: {no_space_message(ns, full)}", 1)


_left_ray = False  # set by last_line once it has left Ray after the closing line; read by end


def last_line(ns, message: str, code: int) -> int:
    """Print the line that ends a command, and return its exit code. Ray's printer of worker lines is stopped
    first (a batch it is printing ends before), so no worker line follows the line; Ray is left after it,
    with stdout and stderr silenced, so a shutdown that ends the process itself (Ray's native code can)
    cannot take the line with it; and `end` then ends the process at once."""
    global _left_ray
    ray = sys.modules.get("ray")  # (never imported here: `cffa synth` and a bad flag run without Ray)
    joined = ray is not None and ray.is_initialized()
    if joined:
        internals.stop_worker_lines()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()  # worker lines already printed come before the line, also in a merged pipe
    print(f"cffa {ns.command}: {message}", file=sys.stderr, flush=True)
    if joined:
        with silenced(), contextlib.suppress(Exception):  # the line matters more than a clean disconnect
            ray.shutdown()
        _left_ray = True
    return code


def end(code: int) -> None:
    """Exit with `code`. After a closing line that left Ray, at once (os._exit), without the interpreter's
    shutdown: threads Ray leaves behind can print while it runs, after the line (seen: a traceback of Ray
    Data's executor cancelling a task after the shutdown, "No owner found for object", on SIGHUP)."""
    if _left_ray:
        os._exit(code)
    sys.exit(code)


def entry(argv: list[str] | None = None) -> None:
    """The `cffa` command (and jobs/*.py): main(argv), then `end`."""
    end(main(argv))


if __name__ == "__main__":
    entry()
