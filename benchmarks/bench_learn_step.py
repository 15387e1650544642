"""Cost of one `learn` training step against a plain forward+backward of the same model.

For each compute dtype (fp32, bf16 mixed precision) and block size, one learn step (distillation,
tuned FFN weights, projection control: the default run) and one plain dense forward+backward
(cross-entropy, all weights trained, in the same dtype) are timed side by side, alternating, on the
same batch shape. The table gives medians with min-max, tokens/s, and the ratio to the plain step.
Speed needs no real weights: by default the model is SmolLM2-135M's shape with random weights
(pass --model default or a folder to use real ones).

    python benchmarks/bench_learn_step.py [--block-sizes 1,4,16] [--dtypes float32,bfloat16]
        [--experts 64 --top-k 1] [--batch-size 4 --seq-len 256] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from momcompress.hardware import cpu_name

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
)


def build(model_arg: str | None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if model_arg is None:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M)).eval()
    from momcompress.models import load_model, resolve_model_dir

    return load_model(resolve_model_dir(model_arg))[0]


def plain_step_fn(model_arg, ids, dtype: torch.dtype):
    """A plain fine-tuning step: forward + cross-entropy + backward + SGD on every weight."""
    plain = build(model_arg)
    plain.requires_grad_(True)
    opt = torch.optim.SGD(plain.parameters(), lr=0.0)
    mixed = dtype != torch.float32

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=mixed):
            logits = plain(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def spread(v: list[float]) -> str:
    return f"{min(v):.2f}-{max(v):.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder, .gguf or 'default' (default: random SmolLM2-135M shape)")
    ap.add_argument("--block-sizes", default="1,4,16")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from momcompress.config import LearnConfig
    from momcompress.learn.trainer import Learner

    ids = torch.randint(3, 49152, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        plain = plain_step_fn(args.model, ids, dtype)
        for b in (int(x) for x in args.block_sizes.split(",")):
            cfg = LearnConfig(
                steps=10_000, batch_size=args.batch_size, seq_len=args.seq_len, experts=args.experts, top_k=args.top_k,
                block_size=b, dtype=dtype_name,
            )
            learner = Learner(build(args.model), cfg, block_size=b, device=torch.device("cpu"))
            fns = {"plain": plain, "learn": lambda: learner.train_step(ids, 0)}
            times = {k: [] for k in fns}
            for fn in fns.values():  # warm-up
                fn()
            for _ in range(args.repeats):
                for k, fn in fns.items():  # alternate, side by side
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({
                "dtype": dtype_name, "block_size": b, "learn_s": med["learn"], "learn_spread": [min(times["learn"]), max(times["learn"])],
                "plain_s": med["plain"], "plain_spread": [min(times["plain"]), max(times["plain"])],
                "ratio_to_plain": med["learn"] / med["plain"], "tok_per_s": tokens / med["learn"],
            })
            r = rows[-1]
            print(f"{dtype_name:<9} b={b:<3} learn {r['learn_s']:6.2f} s ({spread(times['learn'])})  plain {r['plain_s']:6.2f} s "
                  f"({spread(times['plain'])})  ratio {r['ratio_to_plain']:5.2f}  {r['tok_per_s']:6.0f} tok/s", flush=True)

    print(f"\n{tokens} tokens per step, {torch.get_num_threads()} threads, E={args.experts}, top-{args.top_k}, "
          f"distillation + tuned FFN weights, projection control; medians of interleaved rounds; CPU: {cpu_name()}")
    print(f"{'dtype':<9} {'block':>5} {'learn s':>8} {'plain s':>8} {'ratio':>6} {'tok/s':>7}")
    for r in rows:
        print(f"{r['dtype']:<9} {r['block_size']:>5} {r['learn_s']:8.2f} {r['plain_s']:8.2f} {r['ratio_to_plain']:6.2f} {r['tok_per_s']:7.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
                       "experts": args.experts, "top_k": args.top_k, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
