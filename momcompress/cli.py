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
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML file of options; flags given on the command line override it.")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="Fraction of FFN parameters read per token to reach (default 0.5).")
@click.option("--experts", type=click.IntRange(min=1), help="Experts (masks) per layer (default 16).")
@click.option("--top-k", type=click.IntRange(min=1), help="Experts each token uses (default 1); at most --experts.")
@click.option("--block-size", type=click.IntRange(min=1), help="Neurons per gate block; must divide the FFN width (default: the largest power of two <= 64 leaving >= 96 blocks).")
@click.option("--steps", type=click.IntRange(min=1), help="Optimisation steps (default 100: about 17 minutes for SmolLM2-135M on 2 CPU cores).")
@click.option("--tokens", type=click.IntRange(min=1), help="Training token budget instead of --steps: steps = tokens / (batch size x seq len x processes).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per step and process (default 4).")
@click.option("--seq-len", type=click.IntRange(min=2), help="Tokens per sequence (default 256).")
@click.option("--lr", type=click.FloatRange(min=0), help="Adam learning rate of the gates (default 0.3).")
@click.option("--router-lr", type=click.FloatRange(min=0), help="Adam learning rate of the routers (default 1e-3).")
@click.option("--lambda-lr", type=click.FloatRange(min=0), help="Gradient-ascent step of the Lagrange multipliers (default 2.0).")
@click.option("--control", type=click.Choice(["projection", "lagrangian"]), help="Ratio control: projection (exact schedule, default) or lagrangian (multipliers only).")
@click.option("--warmup", type=click.FloatRange(0, 1), help="Fraction of steps over which the target falls from 1 to --target (default 0.6).")
@click.option("--tune-weights/--no-tune-weights", default=None, help="Also train the model's FFN weights, distilled from a frozen copy of the original (default on).")
@click.option("--weight-lr", type=click.FloatRange(min=0), help="Learning rate of the model's weights with --tune-weights (default 1e-4).")
@click.option("--distill/--no-distill", default=None, help="Train on KL divergence to the dense model's logits (default on) instead of the LM loss.")
@click.option("--init", type=click.Choice(["importance", "uniform"]), help="Gate/router initialisation (default importance).")
@click.option("--data", help="Calibration text: .txt file or folder, .jsonl, .parquet or a saved `datasets` folder (default: the embedded novels).")
@click.option("--text-field", help="Field holding the text in .jsonl / .parquet / datasets data (default: text, content, passage or document).")
@click.option("--eval-tokens", type=click.IntRange(min=0), help="Held-out tokens for the final perplexity (default 8192; 0 skips it).")
@click.option("--seed", type=int, help="Seed of data order, gate noise and init (default 0).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default auto).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Model dtype (default float32).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="Steps between checkpoints (default 25).")
@click.option("--log-every", type=click.IntRange(min=1), help="Steps between one-line summaries (default 10).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUTPUT.partial from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT folder.")
def learn(model, output, config_file, tokens, resume, overwrite, **flags):
    """Learn per-expert FFN block masks and routers for MODEL on calibration text.

    MODEL is a Hugging Face model folder, a .gguf file, or `default` (the embedded SmolLM2-135M).
    Writes OUTPUT/ with masks.safetensors, trainer_state.pt, manifest.json and log.jsonl, and prints
    the manifest's metrics as JSON on stdout.
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
@click.option("--target", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="Activation ratio to meet (default: the run's target).")
@click.option("--tolerance", type=click.FloatRange(0, 0.5, min_open=True, max_open=True), default=0.01, show_default=True, help="Largest accepted |measured ratio - target|.")
@click.option("--tokens", type=click.IntRange(min=1), help="Held-out tokens the ratio is measured on (default: the run's --eval-tokens, or 8192).")
@click.option("--data", help="Held-out text to measure on instead of the run's held-out split (.txt, .jsonl, .parquet, datasets folder).")
@click.option("--uniform-experts", is_flag=True, help="Pad experts to equal width with zero blocks, for runtimes that need uniform experts.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), help="The source model folder, if it moved since learn ran (its sha256 must match).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Windows per forward pass while measuring.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT folder.")
def freeze(run_dir, output, target, tolerance, tokens, data, uniform_experts, model_dir, device, batch_size, overwrite):
    """Freeze the learn run RUN_DIR into a loadable sparse model folder.

    Picks deterministic gates whose activation ratio, measured with the real router on held-out tokens,
    meets the target; classifies every FFN block as shared, routed or pruned; repacks the weights into
    contiguous tensors. Prints the per-layer split and sizes; OUTPUT loads with `momcompress.load(OUTPUT)`.
    """
    from momcompress.freeze.freezer import format_block_table
    from momcompress.freeze.freezer import freeze as run_freeze

    try:
        m = run_freeze(
            run_dir, output, target=target, tokens=tokens, data=data, tolerance=tolerance, uniform_experts=uniform_experts,
            model=model_dir, overwrite=overwrite, device=device, batch_size=batch_size,
        )
    except MomcompressError as exc:
        _fail(exc)
    p = m["parameters"]
    click.echo(format_block_table(m))
    click.echo(
        f"target {m['target']:.3f}, measured ratio {m['measured_ratio']:.4f} on {m['heldout_tokens']} held-out tokens; "
        f"threshold: {m['threshold']['rule']}"
    )
    if m["uniform_experts"]:
        click.echo(f"uniform experts: padding adds {m['padding_overhead']:.1%} to the routed expert entries")
    click.echo(
        f"parameters on disk: {p['dense_total']:,} dense -> {p['frozen_total']:,} frozen "
        f"({m['disk_bytes']['dense'] / 1e6:.1f} MB -> {m['disk_bytes']['frozen'] / 1e6:.1f} MB)"
    )
    click.echo(
        f"active per token: FFN {p['ffn_active_per_token']:,} of {p['dense_ffn_active_per_token']:,} "
        f"({p['ffn_active_per_token'] / p['dense_ffn_active_per_token']:.3f}, incl. router); whole model "
        f"{p['model_active_per_token']:,} of {p['dense_model_active_per_token']:,} "
        f"({p['model_active_per_token'] / p['dense_model_active_per_token']:.3f}, incl. attention, embedding row, lm_head)"
    )
    ppl = m["perplexity"]
    click.echo(f"held-out perplexity: dense {ppl['dense']:.2f}, frozen {ppl['frozen']:.2f} ({ppl['tokens']} tokens)")
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
