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


if __name__ == "__main__":
    sys.exit(main())
