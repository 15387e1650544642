"""How much of a learned MoM model's perplexity gap is the router's, and how much the masks'?

Takes a finished `momcompress learn` run (top-1) and evaluates its masks and tuned weights on the
run's own held-out windows under three routings, each with its deterministic gates matched to the
run's target ratio the way learn's final evaluation matches them:

- learned: the run's router (what freeze ships);
- oracle: in every layer, each token takes the expert whose masked FFN output is closest (L2) to the
  original dense FFN's output on the same input. It is greedy (a layer's choice does not look at later
  layers or at the final loss), so a router could still beat it, by an amount this does not measure;
- random: a uniformly random expert per token and layer (what the masks give without any routing).

If the oracle is far from dense too, the masks (the E fixed neuron sets) cap quality, not the router.

    python benchmarks/routing_oracle.py RUN_DIR --tokens 2048 --json routing_oracle.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import types
from pathlib import Path

import torch

from momcompress.hardware import cpu_name

ROUTINGS = ("learned", "oracle", "random")


def oracle_choice(layer, x: torch.Tensor) -> torch.Tensor:
    """(...,) for each token of x, the expert whose masked output is closest to the original FFN's."""
    mlp = layer.mlp
    ref = (layer.reference_mlp if layer.reference_mlp is not None else mlp)(x)
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    z = layer.gate_values().to(h.dtype).repeat_interleave(layer.block_size, dim=-1)  # (E, F)
    best = torch.full(x.shape[:-1], float("inf"), device=x.device)
    pick = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    for e in range(layer.num_experts):
        err = (mlp.down_proj(h * z[e]) - ref).float().pow(2).sum(-1)
        better = err < best
        best, pick = torch.where(better, err, best), torch.where(better, e, pick)
    return pick


def _fixed_route(choose):
    """A MoMFFN.route replacement that sends each token to the one expert choose(layer, x) names."""

    def route(self, x):
        pick = choose(self, x)
        probs = torch.nn.functional.one_hot(pick, self.num_experts).float()
        return probs, torch.ones(*pick.shape, 1, device=x.device), pick.unsqueeze(-1)

    return route


@contextlib.contextmanager
def routing(model, name: str, seed: int = 0):
    """Route every MoM layer of model by NAME (see ROUTINGS) inside the block."""
    from momcompress.learn.mom import mom_layers

    layers = mom_layers(model)
    if name == "learned":
        yield
        return
    if name == "oracle":
        route = _fixed_route(oracle_choice)
    elif name == "random":
        gen = torch.Generator().manual_seed(seed)
        route = _fixed_route(lambda layer, x: torch.randint(0, layer.num_experts, x.shape[:-1], generator=gen).to(x.device))
    else:
        raise ValueError(f"unknown routing {name!r}; choose from {ROUTINGS}")
    for m in layers:
        m.route = types.MethodType(route, m)
    try:
        yield
    finally:
        for m in layers:
            del m.route


def evaluate(run_dir, tokens: int, batch_size: int, routings=ROUTINGS, seed: int = 0) -> dict:
    from momcompress.freeze.freezer import heldout_tokens, load_learned, read_run, resolve_source
    from momcompress.learn.mom import gate_mode
    from momcompress.learn.select import match_target, matched_gates
    from momcompress.metrics import perplexity

    run = read_run(run_dir)
    if not run.experts:
        raise SystemExit(f"{run_dir} learned the per-token selector (--selector activations): the routing oracle is for expert-mask runs")
    if run.config.top_k != 1:
        raise SystemExit(f"{run_dir} routes each token to {run.config.top_k} experts; the oracle is defined for top-1 runs")
    model, tokenizer, _ = load_learned(run, resolve_source(run), torch.device("cpu"))
    model.eval()
    seqs = heldout_tokens(run, tokenizer, None, None)
    seqs = seqs[: max(1, tokens // seqs.shape[1])]
    rows = []
    with torch.no_grad():
        with gate_mode(model, "dense"):
            dense = perplexity(model, seqs, batch_size)
        for name in routings:
            with routing(model, name, seed):
                offset, ratio = match_target(model, seqs, run.config.target, batch_size)
                with matched_gates(model, offset):
                    ppl = perplexity(model, seqs, batch_size)
            rows.append({"routing": name, "ratio": ratio, "offset": offset, "ppl": ppl, "vs_dense": ppl / dense})
            print(f"{name}: ratio {ratio:.3f}, perplexity {ppl:.2f}", file=sys.stderr, flush=True)
    return {"run": str(run_dir), "target": run.config.target, "experts": run.config.experts,
            "block_size": run.manifest["block_size"], "tokens": int(seqs.numel()), "dense": dense, "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"held-out perplexity, {result['tokens']} tokens, E={result['experts']} top-1, b={result['block_size']}, "
             f"gates matched to {result['target']} (dense {result['dense']:.2f})",
             "| routing | FFN ratio | perplexity | x dense |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['routing']} | {r['ratio']:.3f} | {r['ppl']:.2f} | {r['vs_dense']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished `momcompress learn` run (top-1)")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens (the run's own held-out windows)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--routings", default=",".join(ROUTINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result as JSON here")
    args = p.parse_args(argv)
    routings = [r for r in args.routings.split(",") if r]
    if set(routings) - set(ROUTINGS):
        p.error(f"unknown routing(s) {sorted(set(routings) - set(ROUTINGS))}; choose from {ROUTINGS}")
    print(f"# routing oracle: {args.run}, {args.tokens} held-out tokens; CPU: {cpu_name()}", file=sys.stderr, flush=True)
    result = {"cpu": cpu_name(), **evaluate(args.run, args.tokens, args.batch_size, routings, args.seed)}
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
