"""CPU speed of frozen models vs the dense original: the FFN alone, a decode step, generation.

    python benchmarks/bench_freeze.py --frozen FROZEN_DIR [--frozen OTHER ...] [--synthetic] [--dense MODEL] [--json out.json]
    python benchmarks/bench_freeze.py --block-size 1          # synthetic expert plan at ratio 0.5, single neurons
    python benchmarks/bench_freeze.py --frozen SELECTOR_DIR --synthetic --block-size 1   # the per-token selector
                                                              # next to the expert-mask model, same run
    flock /tmp/momcompress-cpu.lock python benchmarks/bench_freeze.py ...   # timings need the machine alone

FFN: every layer's FFN run in sequence (so weights come from memory, not cache, as in a real forward)
on T tokens, for T in --tokens, each layer on its own input from a forward pass of the dense model (the
per-token selector reads what the values make it keep, so random inputs would mislead): dense modules, the frozen modules as they dispatch (auto), and with
--paths also each frozen path forced (native: the compiled row kernel of the per-token selector; fused:
the Numba kernel that multiplies the selected rows where they lie; union: the union of the tokens' blocks, copied first unless it covers most of them; grouped:
tokens grouped by expert; masked: every routed row in one GEMM, unselected ones weighted 0), to find
the crossovers. Decode step: one
token through the whole model with a KV cache after a --prompt-tokens prompt (per-step time, median
over --new-tokens steps). Generation: greedy decoding of --new-tokens tokens, batch 1.
Every model given (--frozen, repeatable: expert-mask or per-token selector folders; --synthetic: the
synthetic expert plan below; --dense-ffn-dtype: dense with 16-bit FFN weights) is a column next to dense. Every variant is timed in the same rounds, interleaved (round i times each variant once, in turn),
after a warm-up; the report gives the median over rounds with the min-max spread, and ratios to dense
(< 1 is faster). Threads are pinned (--threads, default 2) for torch and Numba. The header names the CPU.

With --synthetic (the default without --frozen), a frozen model is built from the dense default model with a random plan that has the
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
from momcompress.runtime import select_ffn as select_ffn_runtime
from momcompress.freeze.plan import plan_layer, repack_layer
from momcompress.hardware import cpu_name
from momcompress.models import decoder_layers, load_model, resolve_model_dir
from momcompress.runtime.mom_ffn import PATHS as MOM_PATHS
from momcompress.runtime.mom_ffn import frozen_layers
from momcompress.runtime.select_ffn import PATHS as SELECT_PATHS
from momcompress.runtime.select_ffn import select_layers


def sparse_layers(model) -> list:
    """The frozen FFN layers of a model: expert-mask (FrozenMoMFFN) or per-token selector (FrozenSelectFFN)."""
    return frozen_layers(model) or select_layers(model)


class NarrowDenseFFN(torch.nn.Module):
    """A dense FFN with its weights stored in a 16-bit dtype (the rest of the model fp32): the input is rounded to
    it and the output widened back. With --dense-ffn-dtype, the fair reference for a selector frozen with
    --table-dtype: what the same 16-bit FFN weights give without any sparsity."""

    def __init__(self, mlp: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.mlp, self.dtype = mlp.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.to(self.dtype)).to(x.dtype)


def narrow_dense(dense, dtype: torch.dtype):
    """A copy of the dense model whose FFNs are NarrowDenseFFN in dtype."""
    import copy

    model = copy.deepcopy(dense)
    for layer in decoder_layers(model):
        layer.mlp = NarrowDenseFFN(layer.mlp, dtype)
    return model.eval()


def layer_paths(model) -> tuple[str, ...]:
    """The paths its layers can be forced onto (a selector's Numba kernel, fused, takes fp32 tables only)."""
    if frozen_layers(model):
        return MOM_PATHS
    sel = select_layers(model)
    return SELECT_PATHS if not sel or sel[0].gate_up.dtype == torch.float32 else tuple(p for p in SELECT_PATHS if p != "fused")


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
    """Force a frozen path: FrozenMoMFFN.PATHS auto (the module's dispatch), fused (the Numba kernel), union
    (the union of the tokens' blocks), grouped (tokens grouped by expert), masked (every routed row);
    FrozenSelectFFN.PATHS auto, fused (the kept rows where they lie), masked (dense matmuls of masked inputs)."""
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


def bench_ffn(dense, models: dict, tokens: list[int], rounds: int, paths: list[str]) -> list[dict]:
    """Every layer's FFN in sequence on T tokens: dense, each model as it dispatches (auto), and each model
    forced onto every path of `paths` its layers have."""
    d_mlps = [layer.mlp for layer in decoder_layers(dense)]
    rows = []
    for T in tokens:
        xs = mlp_inputs(dense, T)  # each layer's real input (the selector's reads depend on the values)
        reps = max(1, int(16 / max(T, 1) ** 0.5))

        def run(mlps, layers=None, path=None):
            if path:
                _set_path(layers, path)
            with torch.no_grad():
                for m, x in zip(mlps, xs):
                    m(x)
            if path:
                _set_path(layers, "auto")

        fns = {"dense": lambda: run(d_mlps)}
        for name, model in models.items():
            mlps, layers = [layer.mlp for layer in decoder_layers(model)], sparse_layers(model)
            fns[name] = lambda mlps=mlps, layers=layers: run(mlps, layers, "auto")
            for path in paths:
                if layers and path in layer_paths(model):
                    fns[f"{name}_{path}"] = lambda mlps=mlps, layers=layers, path=path: run(mlps, layers, path)
        rows.append({"tokens": T, **_row(_interleaved(fns, rounds, reps), "dense")})
    return rows


def mlp_inputs(dense, tokens: int, seed: int = 0, context: int = 32) -> list[torch.Tensor]:
    """What each decoder layer's MLP receives for the last `tokens` of a forward pass of the dense model over
    context + tokens random token ids (not the first positions: their hidden states are unlike the rest's):
    (1, tokens, d) per layer, detached."""
    vocab = dense.config.vocab_size
    ids = torch.randint(3, vocab, (1, context + tokens), generator=torch.Generator().manual_seed(seed))
    mlps = [layer.mlp for layer in decoder_layers(dense)]
    got: list[torch.Tensor] = [None] * len(mlps)  # type: ignore[list-item]
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: got.__setitem__(i, args[0][:, -tokens:].detach().clone()))
             for i, m in enumerate(mlps)]
    try:
        with torch.no_grad():
            dense(ids)
    finally:
        for h in hooks:
            h.remove()
    return got


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


def bench_decode_step(dense, models: dict, prompt_tokens: int, steps: int, rounds: int) -> dict:
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

    fns = {"dense": make(dense), **{name: make(model) for name, model in models.items()}}
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(fn())
    stats = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in times.items()}
    return {"prompt_tokens": prompt_tokens, "steps": steps, **_row(stats, "dense")}


def bench_generate(dense, models: dict, prompt_tokens: int, new_tokens: int, rounds: int) -> dict:
    vocab = dense.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def gen(model):
        with torch.no_grad():
            model.generate(ids, **kw)

    fns = {"dense": lambda: gen(dense), **{name: (lambda m=model: gen(m)) for name, model in models.items()}}
    stats = _interleaved(fns, rounds, 1)
    row = _row(stats, "dense")
    for name in fns:
        row[name]["tok_s"] = new_tokens / stats[name]["median"]
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, **row}


def describe(name: str, model, source: str, ratio) -> dict:
    """One model's line of the header: what it is and the shapes that set its speed."""
    mom, sel = frozen_layers(model), select_layers(model)
    info = {"name": name, "source": source, "ratio": ratio, "layers": len(mom or sel)}
    if mom:
        l0 = mom[0]
        info.update(kind="experts", block_size=l0.block_size, experts=l0.num_experts, top_k=l0.top_k,
                    shared_blocks_layer0=l0.shared_gate.shape[0] // l0.block_size, routed_blocks_layer0=l0.routed_gate.shape[0],
                    fused_cpu_max_tokens=l0.fused_cpu_max_tokens, dtype=str(l0.routed_gate.dtype))
    elif sel:
        from momcompress.kernels import cpu_native, cpu_select

        l0 = sel[0]
        kernel = "native" if cpu_native.available() else "fused" if cpu_select.available() else "none"
        amx = l0.gate_up.dtype == torch.bfloat16 and cpu_native.amx_usable()
        info.update(kind="selector", stored_neurons_layer0=l0.num_neurons, width=l0.width, row_kernel=kernel,
                    masked_products="amx (bf16 tables, fp32-exact split)" if amx else "torch fp32", dtype=str(l0.gate_up.dtype))
    return info


def _fmt(st: dict) -> str:
    return f"{st['median']:8.2f} [{st['min']:.2f}-{st['max']:.2f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frozen", action="append", default=[], help="frozen model folder (repeatable; default: the synthetic plan)")
    p.add_argument("--synthetic", action="store_true", help="also time the synthetic expert plan (the default without --frozen)")
    p.add_argument("--dense", default=None, help="dense model (default: the first frozen folder's source, or `default`)")
    p.add_argument("--ratio", type=float, default=0.5, help="activation ratio of the synthetic plan")
    p.add_argument("--block-size", type=int, default=16, help="block size of the synthetic plan")
    p.add_argument("--experts", type=int, default=64, help="experts of the synthetic plan")
    p.add_argument("--top-k", type=int, default=1, help="top-k of the synthetic plan")
    p.add_argument("--tokens", default="1,4,16,128", help="token counts for the FFN benchmark")
    p.add_argument("--paths", default="", help="also time these frozen paths forced, comma-separated: fused,union,grouped,masked "
                                               "(each model gets those its layers have)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch (and Numba) threads")
    p.add_argument("--breakdown", default="", help="token counts at which to time each stage of the masked path of the "
                                                   "first expert-mask model (comma-separated)")
    p.add_argument("--skip", default="", help="skip parts, comma-separated: ffn,decode,generate")
    p.add_argument("--dense-ffn-dtype", choices=["bfloat16", "float16"],
                   help="also time the dense model with its FFN weights in this dtype (column dense_<dtype>ffn): the "
                        "reference for a selector frozen with --table-dtype, whose tables are 16-bit too")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    models, infos = {}, []
    for folder in args.frozen:
        if not (Path(folder) / "manifest.json").is_file():
            p.error(f"{folder}: not a frozen folder (no manifest.json): give a folder `momcompress freeze` wrote")
    manifests = [json.loads((Path(f) / "manifest.json").read_text()) for f in args.frozen]
    dense_dir = resolve_model_dir(args.dense or (manifests[0].get("source_model") if manifests else None) or "default")
    for folder, manifest in zip(args.frozen, manifests):
        model = momcompress.load(folder)
        if not sparse_layers(model):
            p.error(f"{folder}: no frozen FFN layers (expert-mask or per-token selector) in it")
        name = "selector" if select_layers(model) else "experts"
        name = name if name not in models else f"{name}{len(models)}"
        models[name] = model
        infos.append(describe(name, model, folder, manifest.get("measured_ratio")))
    if args.synthetic or not args.frozen:
        name = "synthetic" if args.frozen else "frozen"
        models[name] = synthetic_frozen(dense_dir, args.ratio, args.block_size, args.experts, args.top_k)
        infos.append(describe(name, models[name], "synthetic", args.ratio))
    dense, _ = load_model(dense_dir)
    dense.eval()
    if args.dense_ffn_dtype:
        name = f"dense_{'bf16' if args.dense_ffn_dtype == 'bfloat16' else 'fp16'}ffn"
        models[name] = narrow_dense(dense, getattr(torch, args.dense_ffn_dtype))
        infos.append({"name": name, "source": str(dense_dir), "kind": "dense", "ffn_dtype": args.dense_ffn_dtype})
    for model in models.values():
        model.eval()
    info = {"cpu": cpu_name(), "dense": str(dense_dir), "d": dense.config.hidden_size, "F": dense.config.intermediate_size,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds}
    print(f"# bench_freeze: CPU {info['cpu']}; " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "cpu"), file=sys.stderr)
    for m in infos:
        print("#   " + ", ".join(f"{k} {v}" for k, v in m.items()), file=sys.stderr)
    out = {"info": info, "models": infos}
    paths = [p for p in args.paths.split(",") if p]
    n_layers = len(decoder_layers(dense))
    if "ffn" not in skip:
        out["ffn"] = bench_ffn(dense, models, [int(t) for t in args.tokens.split(",")], args.rounds, paths)
        print(f"\nFFN, all {n_layers} layers in sequence: ms, median [min-max] of {args.rounds} interleaved rounds; ratio = model / dense")
        names = [n for n in out["ffn"][0] if n != "tokens"]
        print(f"{'tokens':>6} " + " ".join(f"{n:>24}" for n in names) + " " + " ".join(f"{'ratio ' + n:>22}" for n in names[1:]))
        for r in out["ffn"]:
            ratios = " ".join(f"{r[n]['ratio']:>8.3f} [{r[n]['ratio_min']:.2f}-{r[n]['ratio_max']:.2f}]" for n in names[1:])
            print(f"{r['tokens']:>6} " + " ".join(f"{_fmt(r[n]):>24}" for n in names) + "   " + ratios)
    mom_models = [m for m in models.values() if frozen_layers(m)]
    for T in (int(t) for t in args.breakdown.split(",") if t):
        if not mom_models:
            p.error("--breakdown times the expert-mask model's masked path: give one (--frozen or --synthetic)")
        br = bench_breakdown(dense, mom_models[0], T, args.rounds)
        out.setdefault("breakdown", []).append(br)
        print(f"\nwhere the time goes, masked path, {T} tokens, all {n_layers} layers: ms, median [min-max]")
        for name, st in br.items():
            if name != "tokens":
                print(f"  {name:<32} {_fmt(st)}")
    if "decode" not in skip:
        dec = out["decode_step"] = bench_decode_step(dense, models, args.prompt_tokens, args.new_tokens, args.rounds)
        print(f"\ndecode step (1 token, KV cache after a {args.prompt_tokens}-token prompt, whole model): ms, ratio to dense")
        print(f"  {'dense':<12} {_fmt(dec['dense'])}")
        for name in models:
            print(f"  {name:<12} {_fmt(dec[name])}  ratio {dec[name]['ratio']:.3f} [{dec[name]['ratio_min']:.2f}-{dec[name]['ratio_max']:.2f}]")
    if "generate" not in skip:
        gen = out["generate"] = bench_generate(dense, models, args.prompt_tokens, args.new_tokens, args.rounds)
        print(f"\ngreedy generation, batch 1, {gen['prompt_tokens']}-token prompt, {gen['new_tokens']} new tokens: tok/s, time ratio to dense")
        print(f"  {'dense':<12} {gen['dense']['tok_s']:.1f} tok/s")
        for name in models:
            print(f"  {name:<12} {gen[name]['tok_s']:.1f} tok/s  ratio {gen[name]['ratio']:.3f} [{gen[name]['ratio_min']:.2f}-{gen[name]['ratio_max']:.2f}]")
    for name, model in models.items():
        chosen = select_ffn_runtime.auto_decisions(model)
        if chosen:
            out["info"].setdefault("auto_paths", {})[name] = chosen
            print(f"\n{name}: auto's paths, measured in place per layer (layers per path): "
                  + "; ".join(f"{k}: " + ", ".join(f"{p} {n}" for p, n in v.items()) for k, v in chosen.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
