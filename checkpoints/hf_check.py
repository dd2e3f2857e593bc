"""Check a `liquid export` directory with transformers alone: load it, run it, compare with the exporter's numbers.

    python checkpoints/hf_check.py --case EXPORT_DIR REFERENCE.safetensors EXPECTED_CLASS [--case ...] [--atol 1e-5]

Runs with whatever transformers is importable: the main venv's 4.57, or transformers 5 from .venv-hf5
(`PYTHONPATH=.venv-hf5 .venv/bin/python checkpoints/hf_check.py ...`, see Makefile.export). It never imports
this project (the packages are blocked, so an export whose code reached for them fails here).

REFERENCE holds what the project's model computed: `input_ids` [b, s], and optionally
- `logits` [b, s, vocab]: compared, max_abs_diff must be <= --atol;
- `labels` [b, s] (next tokens, -100 ignored): the loss sum and target count are reported;
- `greedy` [1, n] and `prompt_len`: greedy decoding from the first prompt_len tokens, stopping after EOS,
  compared with `generate` (which runs with the export's generation_config.json: with the KV/conv cache
  for lfm2_moe);
- `text_ids` plus the metadata entry `text`: AutoTokenizer must encode the text to these ids.
Each case prints one JSON line (transformers version, class, max_abs_diff, nll_sum/tokens, generate_match,
tokenizer_match, loading problems: missing/unexpected/mismatched keys, ok). Exit status 1 when a case is
not ok.
"""
from __future__ import annotations

import argparse
import json
import sys

PROJECT_PACKAGES = ("pretrain", "parallel", "data_pipeline", "checkpoints", "cluster")


def check(export_dir: str, reference: str, expected_class: str, atol: float) -> dict:
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref = load_file(reference)
    model, info = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    model.eval()
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    out = {"export": export_dir, "transformers": transformers.__version__, "class": type(model).__name__,
           "loading_problems": problems}
    ok = out["class"] == expected_class and not problems
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits.float()
    if "logits" in ref:
        diff = (logits - ref["logits"].float()).abs().max().item()
        out.update(max_abs_diff=diff, atol=atol)
        ok = ok and diff <= atol
    if "labels" in ref:
        labels = ref["labels"]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                reduction="sum")
        out.update(nll_sum=nll.double().item(), tokens=int((labels != -100).sum()))
    if "greedy" in ref:
        n = int(ref["prompt_len"])
        greedy = ref["greedy"]
        with torch.no_grad():
            generated = model.generate(greedy[:, :n], max_new_tokens=greedy.shape[1] - n, do_sample=False)
        out["generate_match"] = generated.tolist() == greedy.tolist()
        ok = ok and out["generate_match"]
    text = _metadata(reference).get("text")
    if text is not None and "text_ids" in ref:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
        out["tokenizer_match"] = (tok(text, add_special_tokens=False)["input_ids"] == ref["text_ids"].tolist()
                                  and tok.eos_token_id == model.config.eos_token_id)
        ok = ok and out["tokenizer_match"]
    out["ok"] = bool(ok)
    return out


def _metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=3, action="append", required=True,
                        metavar=("EXPORT_DIR", "REFERENCE", "EXPECTED_CLASS"))
    parser.add_argument("--atol", type=float, default=1e-5, help="largest allowed logit difference")
    args = parser.parse_args(argv)
    for name in PROJECT_PACKAGES:
        sys.modules[name] = None  # importing the project now raises ImportError
    status = 0
    for export_dir, reference, expected_class in args.case:
        result = check(export_dir, reference, expected_class, args.atol)
        print(json.dumps(result), flush=True)
        status = status or (0 if result["ok"] else 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
