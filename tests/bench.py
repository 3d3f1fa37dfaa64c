"""Benchmarks (`make bench`): DyMoS patched vs unpatched, measured side by side in one run.

(a) one attention call at Wan 1.3B geometry (12 heads x 128), fp32: time ratio (the median, over
    back-to-back pairs of runs, of patched / unpatched: a shared 2-core machine drifts by several percent
    over the minute a set of runs takes, and a pair's ratio cancels that drift) and peak-memory ratio
    (each variant in a fresh process; the peak includes q, k, v, as a GPU's max_memory_allocated would);
(b) end to end: the tiny Wan 2.1 I2V sampled for 20 steps with tau = 0.2, patched vs unpatched,
    interleaved runs, ratio of medians.
Prints a table and writes bench-results.json. Goals: (a) time <= 1.08, memory <= 1.05; (b) <= 1.02.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__:  # `python -m tests.bench` from the repo root
    from .host import REPO, import_host, register_tiny_models
else:  # the memory probe runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host import REPO, import_host

GOALS = {"attention_time": 1.08, "attention_memory": 1.05, "end_to_end_time": 1.02}
HEADS, DIM_HEAD = 12, 128
# Token counts as latent frames x (height/2) x (width/2) of Wan: 4,096 and 16,384 tokens.
GEOMETRIES = {4096: (16, 16, 16), 16384: (16, 32, 32)}
# Pairs of attention runs per token count: the large case is 16x slower and its margin wide.
ATTENTION_PAIRS = {4096: 15, 16384: 3}


BACKENDS = ("attention_pytorch", "host_default")


def attention_function(backend: str):
    """PyTorch SDPA (ComfyUI's choice on GPUs), or what the host picked for this machine (sub-quadratic on CPU)."""
    import comfy.ldm.modules.attention as comfy_attention

    return comfy_attention.optimized_attention if backend == "host_default" else getattr(comfy_attention, backend)


def attention_case(tokens: int, patched: bool, backend: str):
    """A callable doing one attention call as Wan's self-attention makes it, and what it needs."""
    import torch

    from motion_dials.nodes.dymos import DyMoSEffect
    from motion_dials.nodes.patcher_core import (
        FORWARD_KEY,
        PATCH_KEY,
        WAN,
        ForwardState,
        MotionDialsPatch,
        _attention_override,
    )

    frames, height, width = GEOMETRIES[tokens]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tokens, HEADS * DIM_HEAD, generator=generator) for _ in range(3))
    attention = attention_function(backend)
    if not patched:
        return lambda: attention(q, k, v, heads=HEADS, transformer_options={})

    class ActiveSampling:  # every step is inside tau: the call under test is always biased
        @staticmethod
        def percent_to_sigma(percent):
            return 0.5

    state = ForwardState(
        family=WAN, patch_size=(1, 2, 2), sigma=1.0, device=q.device, model_sampling=ActiveSampling(),
        cond_or_uncond=[0], latent_grid=(frames, height * 2, width * 2),
    )
    patch = MotionDialsPatch(WAN, (1, 2, 2), (DyMoSEffect(1.0, 0.2, "uniform", 1),), None)
    state.activate(patch)
    options = {PATCH_KEY: patch, FORWARD_KEY: state, "optimized_attention_override": _attention_override}

    def call():
        state.block_index, state.block_type, state.attention_calls_in_block, state.block_tokens = (
            0, "double_block", 0, tokens)
        return attention(q, k, v, heads=HEADS, transformer_options=options)

    return call


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def memory_probe(tokens: int, patched: bool, backend: str) -> int:
    """Run in a fresh process: peak resident bytes of the call, its inputs included.

    The parent sets MALLOC_MMAP_THRESHOLD_ so every large tensor is its own mapping, returned to the
    system when freed: the resident size then follows the live tensors, sampled by a thread.
    """
    import_host()
    before_inputs = _resident_bytes()
    call = attention_case(tokens, patched, backend)
    peak = _resident_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _resident_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    call()
    done.set()
    sampler.join()
    return peak - before_inputs


def measure_memory(tokens: int, patched: bool, backend: str) -> int:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-probe", str(tokens), "patched" if patched else "unpatched", backend],
        capture_output=True, text=True, check=True, cwd=REPO,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return int(result.stdout.strip().splitlines()[-1])


def timed_pairs(baseline, candidate, pairs: int) -> dict:
    """Run the two callables back to back ``pairs`` times, alternating which goes first.

    Returns both medians and the median of the per-pair ratios candidate / baseline, with its quartiles.
    """
    baseline(), candidate()  # warm-up
    times, ratios = {"baseline": [], "candidate": []}, []
    for pair in range(pairs):
        order = (("baseline", baseline), ("candidate", candidate))
        elapsed = {}
        for name, call in order if pair % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            call()
            elapsed[name] = time.perf_counter() - start
            times[name].append(elapsed[name])
        ratios.append(elapsed["candidate"] / elapsed["baseline"])
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "baseline_s": statistics.median(times["baseline"]),
        "candidate_s": statistics.median(times["candidate"]),
        "pair_ratio": statistics.median(ratios),
        "pair_ratio_quartiles": [quartiles[0], quartiles[2]],
        "ratio_of_medians": statistics.median(times["candidate"]) / statistics.median(times["baseline"]),
    }


def bench_attention(pairs_scale: float) -> list[dict]:
    rows = []
    for backend, tokens in itertools.product(BACKENDS, GEOMETRIES):
        timing = timed_pairs(attention_case(tokens, False, backend), attention_case(tokens, True, backend),
                             max(3, round(ATTENTION_PAIRS[tokens] * pairs_scale)))
        memory = {name: measure_memory(tokens, name == "patched", backend) for name in ("unpatched", "patched")}
        rows.append({
            "bench": f"attention N={tokens}",
            "backend": attention_function(backend).__name__,
            "unpatched_s": timing["baseline_s"],
            "patched_s": timing["candidate_s"],
            "time_ratio": timing["pair_ratio"],
            "time_ratio_quartiles": timing["pair_ratio_quartiles"],
            "unpatched_peak_mib": memory["unpatched"] / 2**20,
            "patched_peak_mib": memory["patched"] / 2**20,
            "memory_ratio": memory["patched"] / memory["unpatched"],
        })
    return rows


def bench_end_to_end(pairs: int) -> dict:
    import torch

    from motion_dials.nodes.dymos import DyMoSMotionSlider

    from .sampling import load_tiny, sample_tiny

    case = "wan2.1_i2v"
    model = load_tiny(case)
    patched = DyMoSMotionSlider.execute(model, 1.0, 0.2, "uniform", 1).result[0]

    def sampler(variant):
        def run():
            with torch.inference_mode():
                sample_tiny(case, variant, steps=20)
        return run

    timing = timed_pairs(sampler(model), sampler(patched), pairs)
    return {
        "bench": "tiny Wan 2.1 I2V, 20 steps, tau 0.2",
        "unpatched_s": timing["baseline_s"],
        "patched_s": timing["candidate_s"],
        "time_ratio": timing["ratio_of_medians"],
        "pair_ratio": timing["pair_ratio"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the number of timed runs (0.3 for a quick, noisier look)")
    parser.add_argument("--memory-probe", nargs=3, metavar=("TOKENS", "VARIANT", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "bench-results.json"))
    args = parser.parse_args()
    if args.memory_probe:
        tokens, variant, backend = args.memory_probe
        print(memory_probe(int(tokens), variant == "patched", backend))
        return

    import_host()
    register_tiny_models()
    attention_rows = bench_attention(args.scale)
    end_to_end = bench_end_to_end(max(3, round(10 * args.scale)))

    print(f"{'benchmark':<40} {'unpatched':>10} {'patched':>10} {'time':>7} {'(quartiles)':>13} {'goal':>6}  "
          f"{'memory':>7} {'goal':>6}")
    for row in attention_rows:
        low, high = row["time_ratio_quartiles"]
        print(f"{row['bench'] + ' (' + row['backend'] + ')':<40} {row['unpatched_s']:>9.3f}s {row['patched_s']:>9.3f}s "
              f"{row['time_ratio']:>7.3f} {f'({low:.3f}-{high:.3f})':>13} {GOALS['attention_time']:>6}  "
              f"{row['memory_ratio']:>7.3f} {GOALS['attention_memory']:>6}")
    print(f"{end_to_end['bench']:<40} {end_to_end['unpatched_s']:>9.3f}s {end_to_end['patched_s']:>9.3f}s "
          f"{end_to_end['time_ratio']:>7.3f} {'':>13} {GOALS['end_to_end_time']:>6}")
    within = all(r["time_ratio"] <= GOALS["attention_time"] and r["memory_ratio"] <= GOALS["attention_memory"]
                 for r in attention_rows) and end_to_end["time_ratio"] <= GOALS["end_to_end_time"]
    print("all within goals" if within else "SOME RATIOS ARE OUTSIDE THEIR GOALS")
    Path(args.out).write_text(json.dumps({"goals": GOALS, "attention": attention_rows, "end_to_end": end_to_end},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
