"""CPU speed of the frozen MoM model vs the dense original: the FFN alone and whole-model generation.

    python benchmarks/bench_freeze.py --frozen FROZEN_DIR [--dense MODEL] [--json out.json]
    python benchmarks/bench_freeze.py            # synthetic plan at ratio 0.5 on the default model

FFN: every layer's FFN run in sequence (so weights come from memory, not cache, as in a real forward)
on T tokens, dense modules vs frozen modules, for T in --tokens. Generation: greedy decoding of
--new-tokens tokens after a --prompt-tokens prompt with the KV cache, batch 1. Dense and frozen are
timed interleaved in the same run and reported as ratios (frozen / dense time; < 1 is faster).

Without --frozen, a frozen model is built from the dense default model with a random plan that has
the same shape as a learned one (E=64 experts, top-1, blocks of 16, a few shared blocks, every
expert half the blocks): speed does not depend on the weights' values.
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
from momcompress.freeze.plan import LayerPlan, repack_layer
from momcompress.models import decoder_layers, default_block_size, ffn_width, load_model, resolve_model_dir
from momcompress.runtime.mom_ffn import frozen_layers


def synthetic_frozen(dense_dir: Path, ratio: float, experts: int = 64, shared_fraction: float = 0.05, seed: int = 0):
    """A frozen copy of the dense model with random expert plans whose per-token read fraction is ratio."""
    model, _ = load_model(dense_dir)
    b = default_block_size(ffn_width(model))
    gen = torch.Generator().manual_seed(seed)
    act = "silu"
    for layer in decoder_layers(model):
        mlp = layer.mlp
        N = mlp.gate_proj.out_features // b
        S = round(shared_fraction * N)
        perm = torch.randperm(N, generator=gen).tolist()
        shared, rest = sorted(perm[:S]), perm[S:]
        per_expert = round(ratio * N) - S  # routed blocks each token reads (top-1)
        routed = sorted(rest)
        slot = {j: i for i, j in enumerate(routed)}
        experts_lists = []
        for _ in range(experts):
            pick = torch.randperm(len(rest), generator=gen)[:per_expert].tolist()
            experts_lists.append(sorted(slot[rest[i]] for i in pick))
        plan = LayerPlan(
            N, shared, routed, [], experts_lists, [[1.0] * len(e) for e in experts_lists], [[1.0] * S for _ in range(experts)],
            padding=[0] * experts,
        )
        router = torch.randn(experts, mlp.gate_proj.in_features, generator=gen) * 0.05
        layer.mlp = repack_layer(mlp, router, plan, 1, b, act)
    return model


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def bench_ffn(dense, frozen, tokens: list[int], rounds: int) -> list[dict]:
    d_mlps = [layer.mlp for layer in decoder_layers(dense)]
    f_mlps = [layer.mlp for layer in decoder_layers(frozen)]
    hidden = d_mlps[0].gate_proj.in_features
    rows = []
    for T in tokens:
        x = torch.randn(1, T, hidden)
        reps = max(1, int(64 / max(T, 1) ** 0.5))

        def run(mlps):
            with torch.no_grad():
                for m in mlps:
                    m(x)

        dense_t, frozen_t = [], []
        for _ in range(rounds):  # interleaved: both see the same machine state
            dense_t.append(_time(lambda: run(d_mlps), reps))
            frozen_t.append(_time(lambda: run(f_mlps), reps))
        dm, fm = statistics.median(dense_t), statistics.median(frozen_t)
        rows.append({"tokens": T, "dense_ms": dm * 1e3, "frozen_ms": fm * 1e3, "ratio": fm / dm})
    return rows


def bench_generate(dense, frozen, prompt_tokens: int, new_tokens: int, rounds: int) -> dict:
    vocab = dense.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def gen(model):
        with torch.no_grad():
            model.generate(ids, **kw)

    dense_t, frozen_t = [], []
    for _ in range(rounds):
        dense_t.append(_time(lambda: gen(dense), 1))
        frozen_t.append(_time(lambda: gen(frozen), 1))
    dm, fm = statistics.median(dense_t), statistics.median(frozen_t)
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "dense_tok_s": new_tokens / dm,
        "frozen_tok_s": new_tokens / fm,
        "speedup": dm / fm,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frozen", help="frozen model folder (default: synthetic plan on the default model)")
    p.add_argument("--dense", default=None, help="dense model (default: the frozen folder's source, or `default`)")
    p.add_argument("--ratio", type=float, default=0.5, help="activation ratio of the synthetic plan")
    p.add_argument("--tokens", default="1,4,16,128", help="token counts for the FFN benchmark")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.frozen:
        frozen = momcompress.load(args.frozen)
        manifest = json.loads((Path(args.frozen) / "manifest.json").read_text())
        dense_dir = resolve_model_dir(args.dense or manifest.get("source_model") or "default")
        ratio = manifest.get("measured_ratio")
    else:
        dense_dir = resolve_model_dir(args.dense or "default")
        frozen = synthetic_frozen(dense_dir, args.ratio)
        ratio = args.ratio
    dense, _ = load_model(dense_dir)
    layers = frozen_layers(frozen)
    print(
        f"dense {dense_dir.name}: {len(layers)} layers, d={dense.config.hidden_size}, F={dense.config.intermediate_size}; "
        f"frozen: {'synthetic' if not args.frozen else args.frozen}, ratio {ratio:.3f}, E={layers[0].num_experts}, "
        f"top-{layers[0].top_k}, b={layers[0].block_size}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    ffn = bench_ffn(dense, frozen, [int(t) for t in args.tokens.split(",")], args.rounds)
    gen = bench_generate(dense, frozen, args.prompt_tokens, args.new_tokens, args.rounds)
    print(f"\nFFN, all {len(layers)} layers in sequence (median of {args.rounds} interleaved rounds)")
    print(f"{'tokens':>7} {'dense ms':>10} {'frozen ms':>10} {'frozen/dense':>13}")
    for r in ffn:
        print(f"{r['tokens']:>7} {r['dense_ms']:>10.2f} {r['frozen_ms']:>10.2f} {r['ratio']:>13.3f}")
    print(f"\ngreedy generation, batch 1, {gen['prompt_tokens']}-token prompt, {gen['new_tokens']} new tokens")
    print(f"dense {gen['dense_tok_s']:.1f} tok/s, frozen {gen['frozen_tok_s']:.1f} tok/s, speedup {gen['speedup']:.3f}x")
    if args.json:
        out = {"ratio": ratio, "frozen": args.frozen or "synthetic", "dense": str(dense_dir), "threads": torch.get_num_threads(), "ffn": ffn, "generate": gen}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
