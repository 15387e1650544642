"""CPU speed of the frozen MoM model vs the dense original: the FFN alone, a decode step, generation.

    python benchmarks/bench_freeze.py --frozen FROZEN_DIR [--dense MODEL] [--json out.json]
    python benchmarks/bench_freeze.py --block-size 1          # synthetic plan at ratio 0.5, single neurons
    flock /tmp/momcompress-cpu.lock python benchmarks/bench_freeze.py ...   # timings need the machine alone

FFN: every layer's FFN run in sequence (so weights come from memory, not cache, as in a real forward)
on T tokens, for T in --tokens: dense modules, the frozen modules as they dispatch (auto), and with
--paths also each frozen path forced (fused: the Numba kernel that multiplies the selected rows where
they lie; union: the union of the tokens' blocks, copied first unless it covers most of them; grouped:
tokens grouped by expert; masked: every routed row in one GEMM, unselected ones weighted 0), to find
the crossovers. Decode step: one
token through the whole model with a KV cache after a --prompt-tokens prompt (per-step time, median
over --new-tokens steps). Generation: greedy decoding of --new-tokens tokens, batch 1.
Every variant is timed in the same rounds, interleaved (round i times each variant once, in turn),
after a warm-up; the report gives the median over rounds with the min-max spread, and ratios to dense
(< 1 is faster). Threads are pinned (--threads, default 2) for torch and Numba.

Without --frozen, a frozen model is built from the dense default model with a random plan that has the
shape of a learned one (--experts experts, top --top-k, blocks of --block-size, a few shared blocks,
each expert's blocks a random subset such that a token reads --ratio of the FFN): speed does not depend
on the weights' values or on which blocks the router picks, only on how many.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import momcompress
from momcompress.freeze.plan import plan_layer, repack_layer
from momcompress.models import decoder_layers, load_model, resolve_model_dir
from momcompress.runtime.mom_ffn import frozen_layers


def synthetic_frozen(dense_dir: Path, ratio: float, block_size: int, experts: int = 64, top_k: int = 1, shared_fraction: float = 0.05, seed: int = 0):
    """A frozen copy of the dense model with random expert plans whose per-token read fraction is ratio
    (with top_k > 1 each expert gets 1/top_k of the routed share, so a token's union is at most ratio)."""
    model, _ = load_model(dense_dir)
    b = block_size
    gen = torch.Generator().manual_seed(seed)
    act = "silu"
    for layer in decoder_layers(model):
        mlp = layer.mlp
        N = mlp.gate_proj.out_features // b
        S = round(shared_fraction * N)
        perm = torch.randperm(N, generator=gen).tolist()
        shared, rest = sorted(perm[:S]), perm[S:]
        per_expert = (round(ratio * N) - S) // top_k  # routed blocks per expert (a token reads top_k of them)
        gates = torch.zeros(experts, N)  # (E, N): each expert's blocks on, then the planner repacks them
        gates[:, shared] = 1.0
        rest_t = torch.tensor(rest, dtype=torch.long)
        for e in range(experts):
            gates[e, rest_t[torch.randperm(len(rest), generator=gen)[:per_expert]]] = 1.0
        plan = plan_layer(gates)
        router = torch.randn(experts, mlp.gate_proj.in_features, generator=gen) * 0.05
        layer.mlp = repack_layer(mlp, router, plan, top_k, b, act)
    return model


def _time(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _interleaved(fns: dict, rounds: int, reps: int) -> dict:
    """Median and min-max over rounds of each fn's time per call (s); each round times every fn in turn."""
    for fn in fns.values():
        fn()  # warm-up (first calls compile, allocate, fault pages in)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_time(fn, reps))
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in times.items()}


def _set_path(layers, path: str) -> None:
    """Force a frozen path (FrozenMoMFFN.PATHS): auto (the module's dispatch), fused (the Numba kernel),
    union (the union of the tokens' blocks), grouped (tokens grouped by expert), masked (every routed row)."""
    for m in layers:
        m.path = path


def _row(stats: dict, base: str, unit: float = 1e3) -> dict:
    """Medians (ms) and spreads of every variant, and their ratios to base."""
    row = {}
    for name, st in stats.items():
        row[name] = {k: v * unit for k, v in st.items()}
        if name != base:
            row[name]["ratio"] = st["median"] / stats[base]["median"]
            # The ratio's range from the two spreads: if it straddles 1, the sign of the difference is noise.
            row[name]["ratio_min"] = st["min"] / stats[base]["max"]
            row[name]["ratio_max"] = st["max"] / stats[base]["min"]
    return row


def bench_ffn(dense, frozen, tokens: list[int], rounds: int, paths: list[str]) -> list[dict]:
    d_mlps = [layer.mlp for layer in decoder_layers(dense)]
    f_mlps = [layer.mlp for layer in decoder_layers(frozen)]
    layers = frozen_layers(frozen)
    hidden = d_mlps[0].gate_proj.in_features
    rows = []
    for T in tokens:
        x = torch.randn(1, T, hidden)
        reps = max(1, int(16 / max(T, 1) ** 0.5))

        def run(mlps, path=None):
            if path:
                _set_path(layers, path)
            with torch.no_grad():
                for m in mlps:
                    m(x)
            if path:
                _set_path(layers, "auto")

        fns = {"dense": lambda: run(d_mlps), "frozen": lambda: run(f_mlps, "auto")}
        for path in paths:
            fns[f"frozen_{path}"] = lambda path=path: run(f_mlps, path)
        rows.append({"tokens": T, **_row(_interleaved(fns, rounds, reps), "dense")})
    return rows


def bench_breakdown(dense, frozen, tokens: int, rounds: int) -> dict:
    """Where the frozen FFN's time goes on the masked path at T tokens, all layers in sequence: each
    stage of FrozenMoMFFN.routed_masked timed alone, next to the dense MLP's three GEMMs (ms)."""
    import torch.nn.functional as F

    from momcompress.kernels.reference import ACTIVATIONS, block_weights

    d_mlps = [layer.mlp for layer in decoder_layers(dense)]
    layers = frozen_layers(frozen)
    x = torch.randn(tokens, d_mlps[0].gate_proj.in_features)
    rows = [m._aligned_rows() for m in layers]  # the padded row views the masked path multiplies
    routes = [m.route(x) for m in layers]
    hs = [torch.randn(tokens, g.shape[0]) for g, _, _ in rows]
    hd = torch.randn(tokens, d_mlps[0].down_proj.in_features)
    reps = max(1, int(16 / max(tokens, 1) ** 0.5))

    def each(fn, items):
        def run():
            with torch.no_grad():
                for item in items:
                    fn(*item)
        return run

    act = ACTIVATIONS[layers[0].activation]
    fns = {
        "dense: gate+up GEMMs": each(lambda m: (F.linear(x, m.gate_proj.weight), F.linear(x, m.up_proj.weight)), [(m,) for m in d_mlps]),
        "dense: act*up": each(lambda h: act(h) * h, [(hd,)] * len(d_mlps)),
        "dense: down GEMM": each(lambda m: F.linear(hd, m.down_proj.weight), [(m,) for m in d_mlps]),
        "frozen: router + top-k": each(lambda m: m.route(x), [(m,) for m in layers]),
        "frozen: shared part": each(lambda m, r: m.shared_forward(x, *r), list(zip(layers, routes))),
        "frozen: block weights w": each(lambda m, r: block_weights(r[0], r[1], m.expert_block_scale), list(zip(layers, routes))),
        "frozen: routed gate+up GEMMs": each(lambda r: (F.linear(x, r[0]), F.linear(x, r[1])), [(r,) for r in rows]),
        "frozen: act*up*w (in place)": each(lambda h: act(h.clone()).mul_(h), [(h,) for h in hs]),
        "frozen: routed down GEMM": each(lambda h, r: h @ r[2], list(zip(hs, rows))),
        "dense MLP (module)": each(lambda m: m(x), [(m,) for m in d_mlps]),
        "frozen FFN (module, masked)": each(lambda m: m(x), [(m,) for m in layers]),
    }
    for m in layers:
        m.path = "masked"
    try:
        stats = _interleaved(fns, rounds, reps)
    finally:
        for m in layers:
            m.path = "auto"
    return {"tokens": tokens, **{k: {q: v * 1e3 for q, v in st.items()} for k, st in stats.items()}}


def bench_decode_step(dense, frozen, prompt_tokens: int, steps: int, rounds: int) -> dict:
    """Time of one decode step (one token, KV cache, whole model incl. lm_head), per model."""
    from transformers import DynamicCache

    vocab = dense.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    nxt = torch.randint(3, vocab, (1, 1), generator=torch.Generator().manual_seed(1))

    def make(model):
        def step_all():
            with torch.no_grad():
                cache = DynamicCache()
                model(ids, past_key_values=cache, use_cache=True)  # prefill: not timed
                t = time.perf_counter()
                for _ in range(steps):
                    model(nxt, past_key_values=cache, use_cache=True)
                return (time.perf_counter() - t) / steps

        return step_all

    fns = {"dense": make(dense), "frozen": make(frozen)}
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(fn())
    stats = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in times.items()}
    return {"prompt_tokens": prompt_tokens, "steps": steps, **_row(stats, "dense")}


def bench_generate(dense, frozen, prompt_tokens: int, new_tokens: int, rounds: int) -> dict:
    vocab = dense.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def gen(model):
        with torch.no_grad():
            model.generate(ids, **kw)

    stats = _interleaved({"dense": lambda: gen(dense), "frozen": lambda: gen(frozen)}, rounds, 1)
    row = _row(stats, "dense")
    row["dense_tok_s"] = new_tokens / stats["dense"]["median"]
    row["frozen_tok_s"] = new_tokens / stats["frozen"]["median"]
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, **row}


def _fmt(st: dict) -> str:
    return f"{st['median']:8.2f} [{st['min']:.2f}-{st['max']:.2f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frozen", help="frozen model folder (default: synthetic plan on the default model)")
    p.add_argument("--dense", default=None, help="dense model (default: the frozen folder's source, or `default`)")
    p.add_argument("--ratio", type=float, default=0.5, help="activation ratio of the synthetic plan")
    p.add_argument("--block-size", type=int, default=16, help="block size of the synthetic plan")
    p.add_argument("--experts", type=int, default=64, help="experts of the synthetic plan")
    p.add_argument("--top-k", type=int, default=1, help="top-k of the synthetic plan")
    p.add_argument("--tokens", default="1,4,16,128", help="token counts for the FFN benchmark")
    p.add_argument("--paths", default="", help="also time these frozen paths forced, comma-separated: fused,union,grouped,masked")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch (and Numba) threads")
    p.add_argument("--breakdown", default="", help="token counts at which to time each stage of the masked path (comma-separated)")
    p.add_argument("--skip", default="", help="skip parts, comma-separated: ffn,decode,generate")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    if args.frozen:
        frozen = momcompress.load(args.frozen)
        manifest = json.loads((Path(args.frozen) / "manifest.json").read_text())
        dense_dir = resolve_model_dir(args.dense or manifest.get("source_model") or "default")
        ratio = manifest.get("measured_ratio")
    else:
        dense_dir = resolve_model_dir(args.dense or "default")
        frozen = synthetic_frozen(dense_dir, args.ratio, args.block_size, args.experts, args.top_k)
        ratio = args.ratio
    dense, _ = load_model(dense_dir)
    frozen.eval(), dense.eval()
    layers = frozen_layers(frozen)
    l0 = layers[0]
    S = l0.shared_gate.shape[0] // l0.block_size
    info = {
        "dense": str(dense_dir), "frozen": args.frozen or "synthetic", "ratio": ratio, "layers": len(layers),
        "d": dense.config.hidden_size, "F": dense.config.intermediate_size, "block_size": l0.block_size,
        "experts": l0.num_experts, "top_k": l0.top_k, "shared_blocks_layer0": S, "routed_blocks_layer0": l0.routed_gate.shape[0],
        "fused_cpu_max_tokens": l0.fused_cpu_max_tokens, "dtype": str(l0.routed_gate.dtype), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "rounds": args.rounds,
    }
    print(", ".join(f"{k} {v}" for k, v in info.items()), file=sys.stderr)
    out = {"info": info}
    paths = [p for p in args.paths.split(",") if p]
    if "ffn" not in skip:
        out["ffn"] = bench_ffn(dense, frozen, [int(t) for t in args.tokens.split(",")], args.rounds, paths)
        print(f"\nFFN, all {len(layers)} layers in sequence: ms, median [min-max] of {args.rounds} interleaved rounds; ratio = frozen / dense")
        names = [n for n in out["ffn"][0] if n != "tokens"]
        print(f"{'tokens':>6} " + " ".join(f"{n:>24}" for n in names) + " " + " ".join(f"{'ratio ' + n:>22}" for n in names[1:]))
        for r in out["ffn"]:
            ratios = " ".join(f"{r[n]['ratio']:>8.3f} [{r[n]['ratio_min']:.2f}-{r[n]['ratio_max']:.2f}]" for n in names[1:])
            print(f"{r['tokens']:>6} " + " ".join(f"{_fmt(r[n]):>24}" for n in names) + "   " + ratios)
    for T in (int(t) for t in args.breakdown.split(",") if t):
        br = bench_breakdown(dense, frozen, T, args.rounds)
        out.setdefault("breakdown", []).append(br)
        print(f"\nwhere the time goes, masked path, {T} tokens, all {len(layers)} layers: ms, median [min-max]")
        for name, st in br.items():
            if name != "tokens":
                print(f"  {name:<32} {_fmt(st)}")
    if "decode" not in skip:
        dec = out["decode_step"] = bench_decode_step(dense, frozen, args.prompt_tokens, args.new_tokens, args.rounds)
        print(f"\ndecode step (1 token, KV cache after a {args.prompt_tokens}-token prompt, whole model): ms")
        print(f"dense {_fmt(dec['dense'])}, frozen {_fmt(dec['frozen'])}, ratio {dec['frozen']['ratio']:.3f} "
              f"[{dec['frozen']['ratio_min']:.2f}-{dec['frozen']['ratio_max']:.2f}]")
    if "generate" not in skip:
        gen = out["generate"] = bench_generate(dense, frozen, args.prompt_tokens, args.new_tokens, args.rounds)
        print(f"\ngreedy generation, batch 1, {gen['prompt_tokens']}-token prompt, {gen['new_tokens']} new tokens")
        print(f"dense {gen['dense_tok_s']:.1f} tok/s, frozen {gen['frozen_tok_s']:.1f} tok/s, time ratio {gen['frozen']['ratio']:.3f} "
              f"[{gen['frozen']['ratio_min']:.2f}-{gen['frozen']['ratio_max']:.2f}]")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
