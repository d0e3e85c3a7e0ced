"""The per-call overhead between the router and the shard's engine, for settings compared in one call: for
each variant (an environment for the server), a server on the benchmark's dummy Mistral-7B shape, base-model
decode at 1 and 128 streams (bench.py's workload, fewer requests), and the router's step metrics: the
shard's engine step, the shard call as the router times it, the router's whole step.

    python3 scripts/gpu/overhead_ab.py BIN_DIR LOG_DIR NAME=VAR=VALUE[,VAR=VALUE] ...  ("NAME=" for none)

e.g. `graphs= eager=LORAX_CUDA_GRAPHS=0`. Prints BENCH lines as bench.py does; BENCH_DEADLINE
(Unix seconds) bounds it. AB_REGIMES (e.g. "zipf:1 identical") adds, per variant, a run of each adapter
popularity regime at 128 streams over bench.py's 1000 rank-16 adapters (made once, before the servers).
"""

import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as b  # noqa: E402
from serving import start_launcher, stop_launcher, dummy_server_args, write_dummy_model  # noqa: E402


def main():
    b.BIN, b.LOGS = sys.argv[1], sys.argv[2]
    os.makedirs(b.LOGS, exist_ok=True)
    shutil.rmtree(b.WORK, ignore_errors=True)
    model = f"{b.WORK}/mistral-7b-shape"
    write_dummy_model(model, b.CFG)
    os.makedirs(f"{b.WORK}/adapters", exist_ok=True)
    regimes = os.environ.get("AB_REGIMES", "").split()
    if regimes:
        subprocess.run([f"{b.BIN}/lorax-bench", "make-adapters", "--config", f"{model}/config.json", "--count",
                        str(b.N_ADAPTERS), "--rank", str(b.RANK), "--out", f"{b.WORK}/adapters"], check=True)
        os.sync()
    lens = ["--prompt-tokens", str(b.PROMPT), "--output-tokens", str(b.OUT)]
    for spec in sys.argv[3:]:
        name, _, assigns = spec.partition("=")
        env = dict(a.split("=", 1) for a in assigns.split(",") if a)
        srv, b.BASE = start_launcher(b.BIN, dummy_server_args(model, f"{b.WORK}/adapters"),
                                     f"{b.LOGS}/server-{name}.log", env=env)
        try:
            for c, n in ((1, 2), (b.STREAMS, b.STREAMS)):
                label = f"{name}-c{c}"
                b.warm_up(label, 1, n, "--concurrency", str(c), *lens)
                before = b.step_metrics()
                doc = b.bench(label, "--concurrency", str(c), "--requests", str(n), *lens)
                after = b.step_metrics()
                b.throughput(label, doc, c, before, after)
                b.say_steps(before, after, f"{label} {env}")
            for regime in regimes:
                label = f"{name}-{regime.replace(':', '')}-c{b.STREAMS}"
                regime_args = ["--popularity", regime, "--num-adapters", str(b.N_ADAPTERS), *lens]
                b.warm_up(label, 16, b.STREAMS, "--concurrency", str(b.STREAMS), *regime_args)
                before = b.step_metrics()
                doc = b.bench(label, "--concurrency", str(b.STREAMS), "--requests", str(b.STREAMS), *regime_args)
                after = b.step_metrics()
                b.throughput(label, doc, b.STREAMS, before, after)
                b.say_steps(before, after, f"{label} {env}")
        finally:
            stop_launcher(srv, timeout=15)
    b.runs_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
