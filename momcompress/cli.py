"""The `momcompress` command line: thin commands that parse options, build a config and call the library."""

from __future__ import annotations

import json
import logging
import sys

import click

from momcompress.errors import MomcompressError

def _fail(exc: Exception):
    raise click.ClickException(str(exc))


@click.group()
@click.version_option(package_name="momcompress")
@click.option("-v", "--verbose", is_flag=True, help="More log output on stderr.")
def main(verbose: bool):
    """momcompress: turn a dense LLM into a mixture of masks and deploy it."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("momcompress").setLevel(logging.INFO)


@main.command()
@click.argument("model", required=False, default="default")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Run folder to create.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML file of options; flags given on the command line override it.")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Fraction of FFN parameters read per token to reach (default 0.5).")
@click.option("--selector", type=click.Choice(["activations", "experts"]),
              help="How each token's FFN neurons are chosen: activations (default: per-token thresholds on the token's "
                   "own WINA-scored activations, learned per layer with the weights) or experts (the paper's form: one "
                   "learned mask per expert plus a router; the options --experts to --permute apply to it).")
@click.option("--threshold-lr", type=click.FloatRange(min=0),
              help="--selector activations: step of the per-layer log-thresholds (default 0.02; 0 keeps the initial split).")
@click.option("--experts", type=click.IntRange(min=1), help="Experts (masks) per layer (default 64).")
@click.option("--top-k", type=click.IntRange(min=1), help="Experts each token uses (default 1); at most --experts.")
@click.option("--block-size", type=click.IntRange(min=1),
              help="Neurons per gate block; must divide the FFN width (default 1: single neurons).")
@click.option("--steps", type=click.IntRange(min=1),
              help="End-to-end optimisation steps (default 100 for the per-token selector, 150 for --selector experts; "
                   "a selector step on SmolLM2-135M takes 6 to 12 s on 2 CPU cores).")
@click.option("--tokens", type=click.IntRange(min=1),
              help="Training token budget instead of --steps: steps = tokens / (batch size x seq len x processes).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per step and process (default 4).")
@click.option("--seq-len", type=click.IntRange(min=2), help="Tokens per sequence (default 256).")
@click.option("--lr", type=click.FloatRange(min=0), help="Adam learning rate of the gates (default 0.3).")
@click.option("--router-lr", type=click.FloatRange(min=0), help="Adam learning rate of the routers (default 1e-3).")
@click.option("--lambda-lr", type=click.FloatRange(min=0), help="Gradient-ascent step of the Lagrange multipliers (default 2.0).")
@click.option("--control", type=click.Choice(["projection", "lagrangian"]),
              help="Ratio control: projection (exact schedule, default) or lagrangian (multipliers only).")
@click.option("--warmup", type=click.FloatRange(0, 1),
              help="Fraction of all steps over which the target falls from 1 to --target (default 0.3 with --selector experts, 0 with activations).")
@click.option("--layerwise-steps", type=click.IntRange(min=0),
              help="Steps of a layer-wise phase before the end-to-end steps: each FFN's gates and router matched to the "
                   "dense FFN on cached inputs (default 0).")
@click.option("--layerwise-tokens", type=click.IntRange(min=1),
              help="Calibration tokens cached for the layer-wise phase (default 32768).")
@click.option("--tune-weights/--no-tune-weights", default=None,
              help="Also train the model's FFN weights, distilled from a frozen copy of the original (default on).")
@click.option("--weight-lr", type=click.FloatRange(min=0), help="Learning rate of the model's weights with --tune-weights (default 3e-4).")
@click.option("--distill/--no-distill", default=None,
              help="Train on KL divergence to the dense model's logits (default on) instead of the LM loss.")
@click.option("--init", type=click.Choice(["importance", "uniform"]), help="Gate/router initialisation (default importance).")
@click.option("--permute/--no-permute", default=None,
              help="Reorder FFN neurons so each block groups co-activating ones (default on; function-preserving).")
@click.option("--data",
              help="Calibration text: .txt file or folder, .jsonl, .parquet or a saved `datasets` folder (default: "
                   "the embedded novels).")
@click.option("--text-field",
              help="Field holding the text in .jsonl / .parquet / datasets data (default: text, content, passage or "
                   "document).")
@click.option("--eval-tokens", type=click.IntRange(min=0), help="Held-out tokens for the final perplexity (default 8192; 0 skips it).")
@click.option("--seed", type=int, help="Seed of data order, gate noise and init (default 0).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default auto).")
@click.option(
    "--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="Compute dtype: auto (default) = bf16 mixed precision where the hardware has bf16 (fp32 masters "
    "for what trains), else float32.",
)
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="Steps between checkpoints (default 25).")
@click.option("--log-every", type=click.IntRange(min=1), help="Steps between one-line summaries (default 10).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUTPUT.partial from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT folder.")
def learn(model, output, config_file, tokens, resume, overwrite, **flags):
    """Learn which FFN neurons each token of MODEL reads, on calibration text.

    By default (--selector activations) each token keeps the FFN input channels and neurons whose
    WINA score clears its layer's threshold; learn trains the thresholds (how the budget is spread over
    layers) and the FFN weights, distilled from the original model. --selector experts learns the
    paper's per-expert masks and routers instead. MODEL is a Hugging Face model folder, a .gguf file,
    or `default` (the embedded SmolLM2-135M). Writes OUTPUT/ with masks.safetensors, trainer_state.pt,
    manifest.json and log.jsonl, and prints the manifest's metrics as JSON on stdout.
    """
    from momcompress.config import LearnConfig, read_config_file
    from momcompress.learn.trainer import learn as run_learn

    try:
        options = read_config_file(config_file) if config_file else {}
        options.update({k: v for k, v in flags.items() if v is not None})
        if tokens is not None:
            import os

            world = int(os.environ.get("WORLD_SIZE", "1"))
            probe = LearnConfig.from_dict({**options, "steps": 1})
            options["steps"] = max(1, tokens // (probe.tokens_per_step * world))
        config = LearnConfig.from_dict(options)
        manifest = run_learn(model, output, config, resume=resume, overwrite=overwrite)
    except MomcompressError as exc:
        _fail(exc)
    if manifest:
        click.echo(json.dumps({"output": output, **manifest["metrics"]}, indent=2))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Frozen model folder to create.")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Activation ratio to meet (default: the run's target).")
@click.option("--tolerance", type=click.FloatRange(0, 0.5, min_open=True, max_open=True), default=0.01, show_default=True,
              help="Largest accepted |ratio on the calibration (fit) tokens - target|; the same rule as every baseline.")
@click.option("--tokens", type=click.IntRange(min=1),
              help="Tokens to fit the threshold on, and held-out tokens to measure on (default: the run's --eval-tokens, "
                   "or 8192 each).")
@click.option("--data", help="Text to use instead of the run's data: half fits the threshold, half is held out "
                             "(.txt, .jsonl, .parquet, datasets folder).")
@click.option("--uniform-experts", is_flag=True,
              help="Pad experts to equal width with zero blocks, for runtimes that need uniform experts.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False),
              help="The source model folder, if it moved since learn ran (its sha256 must match).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Windows per forward pass while measuring.")
@click.option("--table-dtype", type=click.Choice(["auto", "model", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Per-token selector runs: dtype of the FFN tables. bfloat16 / float16 in an fp32 model halve the bytes "
                   "a token reads (the row kernels still multiply in fp32); the reported perplexity is the rounded tables'. "
                   "auto: bfloat16 in an fp32 model, else the model's; model: the model's dtype.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT folder.")
def freeze(run_dir, output, target, tolerance, tokens, data, uniform_experts, model_dir, device, batch_size, table_dtype,
           overwrite):
    """Freeze the learn run RUN_DIR into a loadable sparse model folder.

    Picks deterministic gates whose activation ratio, measured with the real router on calibration tokens,
    meets the target, then reports ratio and perplexity on held-out tokens the fit never saw; classifies
    every FFN block as shared, routed or pruned; repacks the weights into contiguous tensors. Prints the
    per-layer split and sizes; OUTPUT loads with `momcompress.load(OUTPUT)` or, without momcompress, with
    transformers' `AutoModelForCausalLM.from_pretrained(OUTPUT, trust_remote_code=True)`.
    """
    from momcompress.freeze.freezer import format_block_table
    from momcompress.freeze.freezer import freeze as run_freeze

    try:
        m = run_freeze(
            run_dir, output, target=target, tokens=tokens, data=data, tolerance=tolerance, uniform_experts=uniform_experts,
            model=model_dir, overwrite=overwrite, device=device, batch_size=batch_size, table_dtype=table_dtype,
        )
    except MomcompressError as exc:
        _fail(exc)
    p = m["parameters"]
    click.echo(format_block_table(m))
    click.echo(
        f"target {m['target']:.3f}: fit ratio {m['fit_ratio']:.4f} on {m['fit_tokens']} calibration tokens, "
        f"measured ratio {m['measured_ratio']:.4f} on {m['heldout_tokens']} held-out tokens the fit never saw"
    )
    if m.get("ratio_note"):
        click.echo(f"note: {m['ratio_note']}")
    click.echo(f"threshold: {m['threshold']['rule']}")
    if m.get("uniform_experts"):
        click.echo(f"uniform experts: padding adds {m['padding_overhead']:.1%} to the routed expert entries")
    click.echo(
        f"parameters on disk: {p['dense_total']:,} dense -> {p['frozen_total']:,} frozen "
        f"({m['disk_bytes']['dense'] / 1e6:.1f} MB -> {m['disk_bytes']['frozen'] / 1e6:.1f} MB)"
    )
    click.echo(
        f"active per token: FFN {p['ffn_active_per_token']:,} of {p['dense_ffn_active_per_token']:,} "
        f"({p['ffn_active_per_token'] / p['dense_ffn_active_per_token']:.3f}, incl. router or selector); whole model "
        f"{p['model_active_per_token']:,} of {p['dense_model_active_per_token']:,} "
        f"({p['model_active_per_token'] / p['dense_model_active_per_token']:.3f}, incl. attention, embedding row, lm_head)"
    )
    if m.get("checks", {}).get("table_rounding_logits_rel_diff") is not None:
        click.echo(f"FFN tables in {m['table_dtype']}: half the bytes per parameter read; logits "
                   f"{m['checks']['table_rounding_logits_rel_diff']:.2e} apart from the unrounded tables'")
    ppl = m["perplexity"]
    click.echo(f"held-out perplexity: dense {ppl['dense']:.2f}, frozen {ppl['frozen']:.2f} ({ppl['tokens']} tokens)")
    click.echo(f"wrote {output}")


@main.command()
@click.argument("frozen_dir", type=click.Path(file_okay=False))
@click.option("--dense", "dense", default="default", show_default=True,
              help="The dense original: a model folder, a .gguf file or `default`.")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Report folder; methods validated into one folder are compared there (default: FROZEN_DIR's "
                   "parent/validation).")
@click.option("--data",
              help="Held-out text for perplexity (.txt, .jsonl, .parquet, datasets folder; default: Wikipedia "
                   "paragraphs); never the calibration text.")
@click.option("--text-field", help="Field holding the text in .jsonl / .parquet / datasets data.")
@click.option("--tasks", "task_names",
              help="Comma-separated zero-shot tasks, or `none` (default: "
                   "arc_easy,arc_challenge,piqa,hellaswag,winogrande).")
@click.option("--limit", type=click.IntRange(min=0), default=200, show_default=True, help="Documents per task (0: all).")
@click.option("--heldout-tokens", type=click.IntRange(min=1), default=16384, show_default=True, help="Held-out tokens for perplexity.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Perplexity window length.")
@click.option("--context", type=click.IntRange(min=1), help="Context length the attention FLOPs assume (default: --seq-len).")
@click.option("--min-retention", type=click.FloatRange(0, 2, min_open=True),
              help="Exit with status 1 (after writing the report) when the average zero-shot retention (acc_norm) is "
                   "below this.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows / zero-shot requests per forward pass.")
@click.option("--speed/--no-speed", default=True, show_default=True, help="Time prefill and decode, dense vs sparse.")
@click.option("--prefill-tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Prompt length timed for prefill.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=16, show_default=True, help="Decode steps timed after the prompt.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed rounds (medians are reported).")
@click.option("--onnx", "--onnx-sparse", "onnx_sparse", type=click.Path(exists=True),
              help="`momcompress export` folder (model.onnx) of FROZEN_DIR: times it in onnxruntime against the "
                   "dense model's export.")
@click.option("--onnx-dense", type=click.Path(exists=True),
              help="The dense model's export (default: exported once into the momcompress cache with --onnx's "
                   "settings).")
@click.option("--threads", type=click.IntRange(min=1),
              help="Intra-op threads pinned for every timing, PyTorch and onnxruntime (default: PyTorch's count).")
@click.option("--overwrite", is_flag=True, help="Replace this model's earlier report in the report folder.")
def validate(frozen_dir, dense, output, data, text_field, task_names, limit, heldout_tokens, seq_len, context, min_retention,
             device, batch_size, speed, prefill_tokens, decode_tokens, repeats, onnx_sparse, onnx_dense, threads, overwrite):
    """Validate FROZEN_DIR against its dense original, side by side in one run.

    Measures held-out perplexity, zero-shot accuracy (with retention and bootstrap CIs), the FFN
    activation ratio, active parameters and FLOPs per token, and prefill/decode latency (PyTorch, and
    onnxruntime given --onnx). Writes REPORT_DIR/<model>/report.json, report.md and plots, updates
    REPORT_DIR's comparison of every method validated there, and prints the summary table.
    """
    from momcompress.validate.report import format_summary
    from momcompress.validate.validator import RetentionBelowThresholdError
    from momcompress.validate.validator import validate as run_validate

    try:
        from momcompress.validate.validator import DEFAULT_TASKS

        report = run_validate(
            frozen_dir, dense=dense, output=output, data=data, text_field=text_field,
            task_names=DEFAULT_TASKS if task_names is None else task_names, limit=limit,
            heldout_tokens=heldout_tokens, seq_len=seq_len, context=context, min_retention=min_retention, device=device,
            batch_size=batch_size, measure_speed=speed, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
            speed_repeats=repeats, onnx_dense=onnx_dense, onnx_sparse=onnx_sparse, threads=threads, overwrite=overwrite,
        )
    except RetentionBelowThresholdError as exc:
        click.echo(format_summary(exc.report))
        _fail(exc)
    except MomcompressError as exc:
        _fail(exc)
    click.echo(format_summary(report))
    gate = report["gate"]
    if gate["min_retention"] is not None:
        click.echo(f"average zero-shot retention ({gate['metric']}) {gate['average_zero_shot_retention']:.3f} "
                   f">= --min-retention {gate['min_retention']}: passed")
    click.echo(f"wrote {report['report_dir']}")


@main.command()
@click.argument("method", type=click.Choice(["moefication", "prune", "teal", "wina"]))
@click.argument("model", required=False, default="default")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Baseline model folder to create.")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True,
              help="Fraction of FFN parameters read per token.")
@click.option("--tokens", type=click.IntRange(min=1),
              help="Calibration tokens (moefication, teal, wina: default 16384; prune: learn's training tokens, default "
                   "its --steps).")
@click.option("--steps", type=click.IntRange(min=1), help="prune: learn steps (default: learn's default, 100).")
@click.option("--eval-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Held-out tokens for the measured ratio and perplexities.")
@click.option("--data",
              help="Calibration text: .txt file or folder, .jsonl, .parquet or a saved `datasets` folder (default: "
                   "the embedded novels; held-out: Wikipedia paragraphs).")
@click.option("--text-field", help="Field holding the text in .jsonl / .parquet / datasets data.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per window.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows per forward pass while collecting activations and measuring (teal and wina calibrate in "
                   "one pass).")
@click.option("--block-size", type=click.IntRange(min=1), help="moefication, prune: neurons per block (default as learn).")
@click.option("--experts", type=click.IntRange(min=2),
              help="moefication: experts per layer (default: chosen so top-k / experts meets --target).")
@click.option("--split", type=click.Choice(["global", "search", "equal", "fixed"]), default="global", show_default=True,
              help="teal, wina: how the budget is split between the gate/up input (kept fraction fx) and the down "
                   "input (fh), (2 fx + fh) / 3 = target. global: one split for all layers, the grid point with the "
                   "least KL divergence to the dense model on calibration tokens; search: per layer, least FFN output "
                   "error; equal: fx = fh = target; fixed: fx = --x-kept in every layer.")
@click.option("--x-kept", type=click.FloatRange(0, 1, min_open=True),
              help="teal, wina with --split fixed: kept fraction of the gate/up input in every layer.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data split, clustering, router training and learn.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Model dtype.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT folder.")
def baseline(method, model, output, overwrite, **options):
    """Build the METHOD baseline of MODEL at the same activation ratio as a MoM model.

    METHOD: moefication (balanced neuron clustering + trained router), prune (learn with one expert,
    then freeze: static block pruning), teal (training-free magnitude thresholds on the FFN inputs)
    or wina (the same, each input entry scored by |x_j| times the norm of the weight column it multiplies).
    MODEL is a Hugging Face model folder, a .gguf file, or `default`. OUTPUT is a frozen model folder
    for `validate`; prints the measured ratio, calibration budget and held-out perplexity.
    """
    from momcompress.baselines.base import BaselineConfig, format_summary
    from momcompress.baselines.base import baseline as run_baseline

    try:
        manifest = run_baseline(method, model, output, BaselineConfig(**options), overwrite=overwrite)
    except MomcompressError as exc:
        _fail(exc)
    click.echo(format_summary(manifest))
    click.echo(f"wrote {output}")


def _range3(ctx, param, value):
    """MIN,OPT,MAX -> (int, int, int)."""
    if value is None:
        return None
    try:
        lo, opt, hi = (int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected MIN,OPT,MAX (three integers), got {value!r}") from None
    return lo, opt, hi


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder to create (model.onnx, tokenizer, manifest.json).")
@click.option("--dense", is_flag=True, help="MODEL is a dense model (folder, .gguf or `default`): export it the same way, for comparisons.")
@click.option("--experts-body", type=click.Choice(["gather", "masked-dense", "moe"]), default=None,
              help="Function body of the MoMExperts nodes: gather (reads only the selected blocks), masked-dense "
                   "(plain GEMMs over all routed blocks) or moe (onnxruntime's com.microsoft::MoE, one MoE expert "
                   "per routed block; SiLU models only, onnxruntime only). Default: gather.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset of the default domain (18-23).")
@click.option("--atol", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="Checks pass when |onnxruntime - PyTorch| <= atol + rtol x max|PyTorch value|.")
@click.option("--rtol", type=click.FloatRange(0), default=1e-5, show_default=True,
              help="See --atol (fp32 rounding grows with the logits' scale).")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Greedy tokens that must match PyTorch exactly.")
@click.option("--provider", default="CPUExecutionProvider", show_default=True,
              help="onnxruntime execution provider for the checks (CUDAExecutionProvider needs onnxruntime-gpu).")
@click.option("--trt", is_flag=True, help="Also build a TensorRT engine with the momcompress plugin (needs momcompress[trt] and a GPU).")
@click.option("--trt-precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True, help="Engine precision.")
@click.option("--trt-batch", callback=_range3, default="1,1,4", show_default=True, help="Batch range MIN,OPT,MAX of the engine's profile.")
@click.option("--trt-sequence", callback=_range3, default="1,128,1024", show_default=True, help="New-token range MIN,OPT,MAX per call.")
@click.option("--trt-past", callback=_range3, default="0,128,1024", show_default=True, help="Cached-token range MIN,OPT,MAX.")
@click.option("--trt-rtx-check", type=click.Choice(["SM80", "SM86", "SM89", "SM120"]), default=None,
              help="Also check with TensorRT-RTX (no GPU needed; pip install 'momcompress[trt-rtx]') that the graph, "
                   "functions inlined, parses and builds an engine for this compute capability; lists refused nodes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT folder.")
def export(model, output, dense, experts_body, opset, atol, rtol, new_tokens, provider, trt, trt_precision, trt_batch,
           trt_sequence, trt_past, trt_rtx_check, overwrite):
    """Export the frozen model folder MODEL to ONNX (onnxruntime; --trt: TensorRT), checked against PyTorch.

    The routed experts of each layer become one momcompress::MoMExperts node with an ONNX function
    body, so plain onnxruntime runs the file. Prints a checklist (onnx checker, logits with and without
    past key/values, greedy generation); a failed check exits non-zero and writes nothing.
    """
    from momcompress.export.exporter import export as run_export
    from momcompress.export.exporter import format_checklist
    from momcompress.export.op import DEFAULT_BODY

    trt_options = dict(precision=trt_precision, batch=trt_batch, sequence=trt_sequence, past=trt_past)
    try:
        m = run_export(
            model, output, dense=dense, body=experts_body or DEFAULT_BODY, opset=opset, overwrite=overwrite, atol=atol,
            rtol=rtol, new_tokens=new_tokens, provider=provider, trt=trt, trt_options=trt_options, trt_rtx_check=trt_rtx_check,
        )
    except MomcompressError as exc:
        _fail(exc)
    click.echo(format_checklist(m["checks"]))
    path = m["validation"].get("experts_path")
    selector = (m.get("custom_domain") or {}).get("op_type") == "SelectFFN"
    node = "SelectFFN (the per-token selector)" if selector else "MoMExperts"
    if path == "kernel":
        click.echo(f"{node} ran the compiled momcompress kernel ({m['validation']['ops_library']}); the function body was checked too")
    elif path and m["validation"]["provider"] != "CPUExecutionProvider":
        click.echo(f"{node} ran its function body on {m['validation']['provider']} (the momcompress kernel is CPU-only)")
    elif path:
        from momcompress.export.ort_ops import missing_message

        click.echo(f"{node} ran its function body: {missing_message()}")
    kind = ("MoM, per-token selector, masked-dense body" if selector else f"MoM, {m['experts_body']} body") if m["kind"] == "mom" else "dense"
    files = ", ".join(m["onnx"]["files"] + ([m["tensorrt"]["engine"], m["tensorrt"]["runner"]] if "tensorrt" in m else []))
    click.echo(f"wrote {output}: {files} ({kind}, opset {m['opset']}, {m['onnx']['bytes'] / 1e6:.1f} MB)")


@main.command("build-ops")
@click.option("--force", is_flag=True, help="Rebuild even when a library for this source is cached.")
@click.option("--require", is_flag=True, help="Exit 1 when a library cannot be built here (default: say why and exit 0).")
@click.option("--status", "show_status", is_flag=True, help="Only print which libraries would be used; build nothing.")
def build_ops(force, require, show_status):
    """Build the compiled kernels: the onnxruntime ops (MoMExperts, SelectedRowsFFN, SelectFFN, SelectHidden)
    and the PyTorch CPU ops (the per-token selector's row kernel).

    The onnxruntime ops need onnxruntime's C API headers (Debian's libonnxruntime-dev via apt-get download +
    dpkg -x, no root; or $ORT_INCLUDE_DIR); both compile with g++ ($CXX) and are cached under the momcompress
    cache. Exports and `validate --onnx` register the first in onnxruntime; `momcompress.load` models use the
    second. Without a compiler or the headers it says why and exits 0 (exports run the ONNX function body, the
    PyTorch runtime its other paths); a failed compilation exits 1.
    """
    from momcompress import native
    from momcompress.export import ort_ops
    from momcompress.kernels import cpu_native

    if show_status:
        cpu = cpu_native.find_library()
        click.echo(json.dumps({"onnxruntime": ort_ops.status(),
                               "cpu": {"source_hash": native.sources_hash(cpu_native.SOURCES),
                                       "cache": str(native.cache_root(cpu_native.CACHE_SUBDIR)),
                                       "library": str(cpu) if cpu else None}}, indent=2))
        return
    try:
        path = ort_ops.build(force=force)
        click.echo(f"momcompress onnxruntime ops: {path} (onnxruntime C API {ort_ops.library_api_version(path)})")
    except ort_ops.OrtOpsUnavailableError as exc:
        if require:
            _fail(exc)
        click.echo(f"momcompress ops not built: {exc}. Exports still run (the ONNX function body, slower).", err=True)
    except MomcompressError as exc:
        _fail(exc)
    try:
        path = cpu_native.build(force=force)
        cpu_native.load(path)
        click.echo(f"momcompress CPU ops (PyTorch): {path}")
    except native.NativeUnavailableError as exc:
        if require:
            _fail(exc)
        click.echo(f"momcompress CPU ops not built: {exc}. The PyTorch runtime still runs (the Numba kernel or the "
                   "masked path, slower).", err=True)
    except MomcompressError as exc:
        _fail(exc)


if __name__ == "__main__":
    main()
