"""Generation scale-out on a simulated multi-node cluster: 1, 2, 3 model actors on nodes of 1 CPU each.

One `ray.cluster_utils.Cluster` (tests/sim_cluster.py): a head for the driver and the CPU stages, and
one worker node per actor, each offering 1 CPU and one `fake_gpu`, so `--worker_resources` puts one
model actor on each. The same `cffa generate` job (`python -m cffa_ray.cli`, RAY_ADDRESS set) runs with
--concurrency 1, 2, 3 in this one run; ratios are to 1 actor. Then the largest pool runs again and
loses a node (SIGKILL) once its first pairs are committed: the recovery is the extra wall time over
the run without the loss, and the gap from the kill to the next committed pair.

    python bench/scaling.py                                   # tiny preset, 128 px, 96 pairs, 10 steps
    python bench/scaling.py --actors 1 2 --num_samples 48

On a 2-core machine the ideal for 2 actors is 2x and 3 actors cannot beat 2x (each actor's torch runs
on one thread, as Ray sets OMP_NUM_THREADS to the actor's CPUs).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.sim_cluster import SimCluster, hard_timeout, wait_for  # noqa: E402

ACCELERATOR = "fake_gpu"


def make_checkpoint(preset: str, resolution: int, work: Path) -> str:
    """A checkpoint of the preset with non-zero LoRA weights (bench/generate.py's)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import generate as bench_generate  # bench/generate.py: a script beside this one, not a package

    return bench_generate.make_checkpoint(argparse.Namespace(preset=preset, resolution=resolution), work)


def committed(out: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in (out / "parquet").glob("part-*.parquet"))


def run_job(cluster: SimCluster, args, ckpt: str, out: Path, actors: int, kill_after_first: bool = False) -> dict:
    """One `cffa generate` on the cluster; its summary.json plus wall time (and the kill's timings)."""
    log = out.with_suffix(".log")
    t0 = time.time()
    proc = cluster.start_cffa(log, "generate", "--checkpoint_dir", ckpt, "--output_dir", out,
                              "--num_samples", args.num_samples, "--steps", args.steps, "--batch_size", args.batch_size,
                              "--model_batch", args.batch_size, "--rows_per_shard", args.batch_size,
                              "--concurrency", actors, "--worker_resources", json.dumps({ACCELERATOR: 1}))
    extra = {}
    if kill_after_first:
        def first_pairs() -> int:
            assert proc.poll() is None, log.read_text()[-4000:]
            return committed(out) if (out / "parquet").is_dir() else 0

        wait_for(first_pairs, 600, "the first committed pairs")
        victim = cluster.actors("PairGenerator")[0]["node_id"]
        t_kill = time.time()
        cluster.remove_node(victim)
        before = committed(out)
        wait_for(lambda: committed(out) > before or proc.poll() is not None, 600, "pairs after the kill", every=0.05)
        extra = {"killed_at_s": t_kill - t0, "committed_at_kill": before, "kill_to_next_pair_s": time.time() - t_kill}
    proc.wait(timeout=1800)
    assert proc.returncode == 0, log.read_text()[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": time.time() - t0, "pairs_per_s": summary["pairs_per_s"],
            "steady_pairs_per_s": summary["steady_pairs_per_s"], "startup_s": summary["startup_s"], **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 3], help="pool sizes, one node each")
    parser.add_argument("--preset", default="tiny", help="dual_unet preset of the checkpoint (default: tiny)")
    parser.add_argument("--resolution", type=int, default=128, help="pixels (default: 128)")
    parser.add_argument("--num_samples", type=int, default=96, help="pairs per job (default: 96)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default: 10)")
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per actor call and per shard (default: 4)")
    parser.add_argument("--no-loss", dest="loss", action="store_false", help="skip the node-loss run")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cffa-scaling-"))
    ckpt = make_checkpoint(args.preset, args.resolution, work)
    results: dict[int, dict] = {}
    most = max(args.actors)
    with hard_timeout(3600, "bench/scaling.py"), SimCluster(work, head_cpus=2) as cluster:
        for _ in range(most):
            cluster.add_node(num_cpus=1, resources={ACCELERATOR: 1})
        for k in args.actors:
            results[k] = run_job(cluster, args, ckpt, work / f"out_{k}", k)
            print(f"{k} actor(s): {json.dumps(results[k])}", flush=True)
        loss = run_job(cluster, args, ckpt, work / "out_loss", most, kill_after_first=True) if args.loss else None
    base = results[args.actors[0]]
    print(f"\ncffa generate, {args.preset} {args.resolution}px, {args.num_samples} pairs x {args.steps} steps, "
          f"batch {args.batch_size}; one node (1 CPU, 1 {ACCELERATOR}) per actor")
    print(f"{'actors':>6} {'wall s':>8} {'pairs/s':>8} {'ratio':>6} {'steady pairs/s':>15} {'ratio':>6} "
          f"{'start-up s':>11}")
    for k, r in results.items():
        print(f"{k:>6} {r['wall_s']:>8.1f} {r['pairs_per_s']:>8.3f} {r['pairs_per_s'] / base['pairs_per_s']:>6.2f} "
              f"{r['steady_pairs_per_s'] or 0:>15.3f} "
              f"{(r['steady_pairs_per_s'] or 0) / base['steady_pairs_per_s']:>6.2f} "
              f"{r['startup_s']:>11.1f}")
    if loss:
        print(f"\nnode lost ({most} actors, SIGKILL {loss['killed_at_s']:.1f}s in, {loss['committed_at_kill']} pairs "
              f"committed): job {loss['wall_s']:.1f}s against {results[most]['wall_s']:.1f}s without the loss "
              f"(+{loss['wall_s'] - results[most]['wall_s']:.1f}s); next pair committed "
              f"{loss['kill_to_next_pair_s']:.1f}s after the kill")
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
