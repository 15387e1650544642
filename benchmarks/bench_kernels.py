"""FFN time of a dense FFN against a frozen MoM FFN running the Triton routed-experts kernels (CUDA, bf16).

For each FFN shape (d, F, b), activation ratio rho and token count T this times
- dense: the FFN as three bf16 nn.Linear matmuls (down(silu(gate(x)) * up(x)));
- mom:   a FrozenMoMFFN with random weights: router, shared blocks as one torch matmul, routed blocks by
         the Triton kernels (decode kernel up to 16 tokens, grouped kernels above);
- routed: the routed kernel alone (torch.ops.momcompress.routed_experts) on the same routing.
The plan is synthetic: S shared blocks and the rest split at random into E disjoint equal experts, with S
chosen so that a token reads S + k * R / E = rho * N of the N blocks. Timing: CUDA events around each
call, the L2 cache flushed before each, the median of --reps calls; in "graph" mode each call is one CUDA
graph replay (no launch overhead), in "eager" mode plain calls. Decode rows (T <= 16) give the achieved
bandwidth: the distinct weight bytes the batch needs (shared + the union of its tokens' routed blocks,
dense: all) over the time. "use" says which path wins ("dense (fallback)" when the sparse path is slower).

    python benchmarks/bench_kernels.py [--tokens 1,4,16,128,2048] [--ratios 0.5,0.3] [--modes graph,eager] [--json out.json]
    python benchmarks/bench_kernels.py --shapes "4096,14336;576,1536" --block-sizes 1,4,16   # each shape at each b
    python benchmarks/bench_kernels.py --smoke     # no GPU: check the kernels in Triton's interpreter

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from momcompress.hardware import cpu_name

# (hidden size d, FFN size F, block size b): SmolLM2-135M (the default model), Llama-3.2-1B, Llama-3-8B.
SHAPES = [(576, 1536, 16), (2048, 8192, 64), (4096, 14336, 64)]
L2_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2 cache (H200: 50 MiB)


class DenseFFN(nn.Module):
    """The gated FFN as plain nn.Linear matmuls."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):  # (T, d) -> (T, d)
        return self.down(F.silu(self.gate(x)) * self.up(x))


def shared_blocks_for_ratio(num_blocks: int, ratio: float, experts: int, top_k: int) -> int:
    """S such that S + top_k * (N - S) / E = ratio * N (disjoint experts of equal size)."""
    if not top_k / experts <= ratio <= 1:
        raise ValueError(f"ratio {ratio} needs {top_k / experts:.3f} <= ratio <= 1 with top-{top_k} of {experts} experts")
    return round(num_blocks * (ratio * experts - top_k) / (experts - top_k))


def build_mom(d: int, f: int, b: int, ratio: float, experts: int, top_k: int, device, seed: int = 0):
    """A FrozenMoMFFN with random bf16 weights and a synthetic plan reading `ratio` of the blocks per token.

    Returns (layer, achieved ratio).
    """
    from momcompress.runtime.mom_ffn import FrozenMoMFFN

    n = f // b
    shared = shared_blocks_for_ratio(n, ratio, experts, top_k)
    routed = n - shared
    sizes = [len(part) for part in torch.arange(routed).tensor_split(experts)]
    layer = FrozenMoMFFN(d, b, n, top_k, shared, routed, sizes, "silu", dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=device) / d**0.5)
        layer.expert_blocks.copy_(torch.randperm(routed, generator=g, device=device))  # random disjoint experts
        layer.expert_scales.fill_(1.0)
        layer.refresh()
    achieved = (shared + top_k * routed / experts) / n
    return layer, achieved


def weight_bytes_needed(layer, x: torch.Tensor) -> int:
    """Distinct weight bytes the batch x needs: router, shared blocks, the union of its tokens' routed blocks."""
    _, top_i = layer.route(x)
    routed = int(layer.expert_uses[top_i.reshape(-1)].any(dim=0).sum())
    shared = layer.shared_gate.shape[0] // layer.block_size
    per_block = layer.block_params() * layer.shared_gate.element_size()
    return (shared + routed) * per_block + layer.router_weight.numel() * layer.router_weight.element_size()


def time_cuda(fn, reps: int, graph: bool) -> float:
    """Median ms of fn() over reps calls (CUDA events, L2 flushed before each call)."""
    for _ in range(3):  # compile the Triton kernels, warm the allocator
        fn()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn()
        call = cuda_graph.replay
    else:
        call = fn
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def check_kernels(layer, d: int) -> str:
    """One checklist line: the layer with kernels vs its torch path, for a decode and a grouped batch."""
    worst = 0.0
    for T in (4, 64):
        x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
        layer.use_kernels = True
        fast = layer(x).float()
        layer.use_kernels = False
        slow = layer(x).float()
        layer.use_kernels = True
        worst = max(worst, ((fast - slow).abs().max() / slow.abs().max()).item())
    mark = "✓" if worst <= 2e-2 else "x"
    return f"{mark} kernels vs torch reference: max diff {worst:.2e} of the output scale (tolerance 2e-2)"


def run(args) -> list[dict]:
    from momcompress.kernels import routed_experts

    torch.manual_seed(0)
    rows = []
    for d, f, b in args.shapes:
        dense = DenseFFN(d, f).to("cuda", torch.bfloat16).requires_grad_(False)
        dense_bytes = 3 * d * f * 2
        for ratio in args.ratios:
            layer, achieved = build_mom(d, f, b, ratio, args.experts, args.top_k, "cuda")
            check = check_kernels(layer, d)
            print(f"shape d={d} F={f} b={b}, ratio {ratio} (achieved {achieved:.3f}): {check}", file=sys.stderr)
            for T in args.tokens:
                x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
                top_w, top_i = layer.route(x)
                routed_args = (x, top_w, top_i, layer.routed_gate, layer.routed_up, layer.routed_down, layer.expert_block_scale, "silu")
                for mode in args.modes:
                    with torch.no_grad():
                        dense_ms = time_cuda(lambda: dense(x), args.reps, mode == "graph")
                        mom_ms = time_cuda(lambda: layer(x), args.reps, mode == "graph")
                        routed_ms = time_cuda(lambda: routed_experts(*routed_args), args.reps, mode == "graph")
                    decode = T <= 16
                    rows.append(dict(
                        d=d, F=f, b=b, ratio=ratio, achieved_ratio=round(achieved, 4), tokens=T, mode=mode,
                        dense_ms=dense_ms, mom_ms=mom_ms, routed_ms=routed_ms, mom_over_dense=mom_ms / dense_ms,
                        dense_gbps=dense_bytes / dense_ms / 1e6 if decode else None,
                        mom_gbps=weight_bytes_needed(layer, x) / mom_ms / 1e6 if decode else None,
                        use="mom" if mom_ms < dense_ms else "dense (fallback)", check=check,
                    ))
                    print_row(rows[-1])
            del layer
        del dense
        torch.cuda.empty_cache()
    return rows


COLUMNS = [  # (title, width, format of the row value)
    ("d", 5, "{d}"), ("F", 6, "{F}"), ("b", 3, "{b}"), ("ratio", 5, "{achieved_ratio:.2f}"), ("T", 5, "{tokens}"),
    ("mode", 5, "{mode}"), ("dense ms", 9, "{dense_ms:.4f}"), ("mom ms", 9, "{mom_ms:.4f}"), ("x dense", 7, "{mom_over_dense:.2f}"),
    ("routed ms", 9, "{routed_ms:.4f}"), ("dense GB/s", 10, "{dense_gbps:.0f}"), ("mom GB/s", 9, "{mom_gbps:.0f}"), ("use", 0, "{use}"),
]
HEADER = " ".join(f"{title:>{width}}" for title, width, _ in COLUMNS)


def print_row(row: dict) -> None:
    cells = []
    for title, width, fmt in COLUMNS:
        key = fmt[1:].split(":")[0].rstrip("}")
        cells.append(f"{'-' if row[key] is None else fmt.format(**row):>{width}}")
    print(" ".join(cells), flush=True)


def smoke() -> int:
    """Run both kernels on a tiny problem in Triton's interpreter (CPU) against the reference."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    try:
        from momcompress.kernels import triton_mom
    except ImportError:
        print("Triton is not installed (pip install 'momcompress[triton]'): nothing to check", file=sys.stderr)
        return 0
    from momcompress.kernels.reference import routed_experts_grouped

    g = torch.Generator().manual_seed(0)
    T, d, b, R, E, k = 20, 32, 1, 48, 4, 2
    x = torch.randn(T, d, generator=g)
    gate, up, down = (torch.randn(R, b, d, generator=g) / d**0.5 for _ in range(3))
    scale = (torch.rand(E, R, generator=g) < 0.5) * torch.rand(E, R, generator=g)  # (E, R) ragged, fractional
    top_w, top_i = torch.softmax(torch.randn(T, E, generator=g), dim=-1).topk(k, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    ref = routed_experts_grouped(x, top_w, top_i, gate, up, down, scale, "silu")  # (T, d)
    failed = 0
    for name, launch, n in (("decode", triton_mom.routed_experts_decode_triton, 4), ("grouped", triton_mom.routed_experts_grouped_triton, T)):
        out = launch(x[:n], top_w[:n], top_i[:n], gate, up, down, scale, "silu")  # the first n tokens
        diff = (out - ref[:n]).abs().max().item()
        ok = diff <= 1e-4 * ref.abs().max().item()
        failed += not ok
        print(f"{'✓' if ok else 'x'} {name} kernel (interpreter, T={n}): max diff {diff:.2e}")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,4,16,128,2048", help="token counts T")
    ap.add_argument("--ratios", default="0.5,0.3", help="activation ratios (fraction of blocks a token reads)")
    ap.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES), help="d,F,b;d,F,b;... (or d,F;... with --block-sizes)")
    ap.add_argument("--block-sizes", default="", help="run every shape at each of these block sizes, e.g. 1,4,16 (overrides the shapes' b)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--modes", default="graph,eager", help="graph (CUDA graph replay) and/or eager")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="without a GPU: check the kernels in Triton's interpreter")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.ratios = [float(r) for r in args.ratios.split(",")]
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    if args.block_sizes:
        args.shapes = [(sh[0], sh[1], int(b)) for sh in shapes for b in args.block_sizes.split(",")]
    elif any(len(sh) != 3 for sh in shapes):
        ap.error("--shapes needs d,F,b for each shape unless --block-sizes is given")
    else:
        args.shapes = shapes
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or set(args.modes) - {"graph", "eager"}:
        ap.error(f"--modes takes graph and/or eager, got {args.modes}")
    for d, f, b in args.shapes:
        if f % b:
            ap.error(f"F={f} is not a multiple of b={b}")
    for ratio in args.ratios:
        try:
            shared_blocks_for_ratio(100, ratio, args.experts, args.top_k)
        except ValueError as err:
            ap.error(str(err))
    if not torch.cuda.is_available():
        print("CUDA is not available: this benchmark times Triton kernels on an NVIDIA GPU; nothing measured "
              "(run with --smoke to check the kernels in Triton's CPU interpreter).")
        return 0
    from momcompress.kernels import kernels_available

    if not kernels_available(torch.device("cuda")):
        print("Triton is not installed: pip install 'momcompress[triton]'", file=sys.stderr)
        return 1
    import triton

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, "
          f"E={args.experts} top-{args.top_k}, median of {args.reps} calls, L2 flushed; host CPU: {cpu_name()}", flush=True)
    print(HEADER, flush=True)
    rows = run(args)
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, dtype="bfloat16",
                    experts=args.experts, top_k=args.top_k, reps=args.reps)
        with open(args.json, "w") as fh:
            json.dump(dict(cpu=cpu_name(), meta=meta, rows=rows), fh, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
