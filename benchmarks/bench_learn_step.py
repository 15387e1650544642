"""Cost of one `learn` training step against a plain forward+backward of the same model.

Both are timed side by side in one process, alternating, on the same batch shape; the table gives
medians and the ratio. Speed needs no real weights: by default the model is SmolLM2-135M's shape
with random weights (pass --model default or a folder to use real ones).

    python benchmarks/bench_learn_step.py [--model default] [--batch-size 4 --seq-len 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder, .gguf or 'default' (default: random SmolLM2-135M shape)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from momcompress.config import LearnConfig
    from momcompress.learn.trainer import Learner

    ids = torch.randint(3, 49152, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))

    # Plain forward + backward of the dense model, training all weights (the usual fine-tuning step).
    plain = build(args.model)
    plain.requires_grad_(True)
    opt = torch.optim.SGD(plain.parameters(), lr=0.0)

    def plain_step():
        logits = plain(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    results = {}
    for distill, tune in ((True, False), (True, True), (False, False)):
        model = build(args.model)
        cfg = LearnConfig(steps=10_000, batch_size=args.batch_size, seq_len=args.seq_len, distill=distill, tune_weights=tune)
        learner = Learner(model, cfg, block_size=16, device=torch.device("cpu"))
        name = f"learn ({'distill' if distill else 'lm'}, {'tuned' if tune else 'frozen'} weights)"
        fns = {"plain fwd+bwd": plain_step, name: lambda: learner.train_step(ids, 0)}
        times = {k: [] for k in fns}
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for k, fn in fns.items():  # alternate, side by side
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {"median_s": med[name], "plain_median_s": med["plain fwd+bwd"], "ratio": med[name] / med["plain fwd+bwd"]}

    tokens = args.batch_size * args.seq_len
    print(f"{'step':<34} {'median s':>9} {'plain s':>9} {'ratio':>7} {'tok/s':>8}")
    for name, r in results.items():
        print(f"{name:<34} {r['median_s']:9.3f} {r['plain_median_s']:9.3f} {r['ratio']:7.2f} {tokens / r['median_s']:8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch_size": args.batch_size, "seq_len": args.seq_len, "threads": torch.get_num_threads(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
