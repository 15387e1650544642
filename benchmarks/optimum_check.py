"""Does optimum's ORTModelForCausalLM run a momcompress export like momcompress.load does? (issue 21, item 5)

Run it in an environment with optimum-onnx (which needs transformers < 5), e.g. a separate venv:

    python3 -m venv /tmp/venv-optimum && . /tmp/venv-optimum/bin/activate
    pip install torch==2.13.0 && pip install 'transformers==4.57.*' 'optimum-onnx==0.1.0' && pip install -e .
    python benchmarks/optimum_check.py EXPORT_DIR FROZEN_DIR [--new-tokens 16]

It loads the tokenizer from EXPORT_DIR with AutoTokenizer (the export's tokenizer_config.json must load in
transformers 4 and 5), then for each path of the MoMExperts nodes (function body; the compiled kernel when
`momcompress build-ops` built it, passed to optimum through `session_options`) compares optimum's logits
with momcompress.load's on a left-padded batch of two prompts and its greedy tokens with theirs. Prints one
line per check and exits 1 on any difference. tests/test_optimum.py runs it (marker `optimum`).

A per-token selector export (SelectFFN nodes) has hard thresholds: a score on a threshold flips with the
order of summation and the flip travels (see the README, "Checking a per-token selector's export"), so
two runtimes need not give the same greedy tokens. For it each path is checked twice: with the thresholds
off on both sides (optimum's session gets the file's threshold initializers replaced through
SessionOptions.add_initializer; momcompress.load's buffers set to -1): logits within atol and greedy tokens
identical to momcompress.load; and with the file's thresholds: greedy tokens identical to momcompress's own
onnxruntime runner (OrtCausalLM) on the same file and path, and the prompt logits reported against
momcompress.load.
"""

from __future__ import annotations

import argparse
import sys

import onnxruntime as ort
import torch
import transformers
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

import momcompress
from momcompress.export import ort_ops
from momcompress.hardware import cpu_name

PROMPTS = ["The river ran cold under the old stone bridge, and the town", "She opened the door"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("frozen_dir")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    n = args.new_tokens
    print(f"# optimum check: transformers {transformers.__version__}, onnxruntime {ort.__version__}; CPU: {cpu_name()}")
    tok = AutoTokenizer.from_pretrained(args.export_dir)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    reference = momcompress.load(args.frozen_dir)
    with torch.no_grad():
        ref_logits = reference(**enc).logits
    ref_tokens = reference.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)[:, -n:]
    print(f"momcompress.load: {ref_tokens.tolist()}")
    library = ort_ops.find_library()
    from momcompress.runtime.select_ffn import select_layers

    if select_layers(reference):
        return check_selector(args, tok, enc, reference, ref_logits, ref_tokens, library)
    failed = False
    for path in (ort_ops.FUNCTION_BODY, ort_ops.KERNEL):
        options = ort.SessionOptions()
        if path == ort_ops.KERNEL:
            if library is None:
                print(f"kernel: skipped ({ort_ops.missing_message()})")
                continue
            ort_ops.register(options, library)
        model = ORTModelForCausalLM.from_pretrained(args.export_dir, session_options=options, provider="CPUExecutionProvider")
        with torch.no_grad():
            logits = model(**enc).logits
        real = enc["attention_mask"].bool()
        diff = float((logits - ref_logits).abs()[real].max())
        tokens = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)[:, -n:]
        same = torch.equal(tokens, ref_tokens)
        ok = same and diff <= args.atol
        failed |= not ok
        print(f"{'✓' if ok else '✗'} optimum ORTModelForCausalLM, MoMExperts {path}: max |logit diff| {diff:.2e} "
              f"(atol {args.atol:g}), {n} greedy tokens x {len(PROMPTS)} prompts {'identical' if same else 'DIFFERENT'}")
    return 1 if failed else 0


def check_selector(args, tok, enc, reference, ref_logits, ref_tokens, library) -> int:
    """The selector export's checks (see the module docstring)."""
    import numpy as np

    from momcompress.export.causal_lm import OrtCausalLM, greedy_generate
    from momcompress.export.checks import THRESHOLD_OFF, threshold_overrides
    from momcompress.runtime.select_ffn import select_layers

    n, real = args.new_tokens, enc["attention_mask"].bool()
    off = threshold_overrides(f"{args.export_dir}/model.onnx")
    layers = select_layers(reference)
    saved = [(m.path, m.x_threshold.clone(), m.h_threshold.clone()) for m in layers]
    for m in layers:
        m.path = "masked"
        m.x_threshold.fill_(THRESHOLD_OFF)
        m.h_threshold.fill_(THRESHOLD_OFF)
    with torch.no_grad():
        off_logits = reference(**enc).logits
    off_tokens = reference.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)[:, -n:]
    for m, (path, x_t, h_t) in zip(layers, saved):
        m.path = path
        m.x_threshold.copy_(x_t)
        m.h_threshold.copy_(h_t)
    failed = False
    for path in (ort_ops.FUNCTION_BODY, ort_ops.KERNEL):
        if path == ort_ops.KERNEL and library is None:
            print(f"kernel: skipped ({ort_ops.missing_message()})")
            continue
        for thresholds in ("off", "on"):
            options = ort.SessionOptions()
            if path == ort_ops.KERNEL:
                ort_ops.register(options, library)
            values = []
            if thresholds == "off":
                values = [(name, ort.OrtValue.ortvalue_from_numpy(v)) for name, v in off.items()]
                for name, value in values:
                    options.add_initializer(name, value)
            model = ORTModelForCausalLM.from_pretrained(args.export_dir, session_options=options, provider="CPUExecutionProvider")
            with torch.no_grad():
                logits = model(**enc).logits
            tokens = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)[:, -n:]
            if thresholds == "off":
                diff = float((logits - off_logits).abs()[real].max())
                same = torch.equal(tokens, off_tokens)
                ok = same and diff <= args.atol
                what = f"max |logit diff| {diff:.2e} vs momcompress.load (atol {args.atol:g}), {n} greedy tokens x {len(PROMPTS)} prompts {'identical' if same else 'DIFFERENT'}"
            else:
                runner = OrtCausalLM(args.export_dir, experts="kernel" if path == ort_ops.KERNEL else "body")
                mine = greedy_generate(runner, enc["input_ids"].numpy(), enc["attention_mask"].numpy(), n)[:, -n:]
                same = np.array_equal(tokens.numpy(), mine)
                diff = float((logits - ref_logits).abs()[real].max())
                ok = same
                what = (f"{n} greedy tokens x {len(PROMPTS)} prompts {'identical' if same else 'DIFFERENT'} to OrtCausalLM's; "
                        f"prompt logits {diff:.2e} from momcompress.load's, greedy tokens "
                        f"{'identical' if torch.equal(tokens, ref_tokens) else 'different (threshold ties)'}")
            failed |= not ok
            print(f"{'✓' if ok else '✗'} optimum ORTModelForCausalLM, SelectFFN {path}, thresholds {thresholds}: {what}")
            del model, values
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
