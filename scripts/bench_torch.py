#!/usr/bin/env python3
"""PyTorch + transformers baseline for `bpo bench generate` (dev-only; not run by the tests).

Builds random-weight LLaVA models from the same config.json that bpo's benchmark uses (`bpo bench generate --size S
--write-config DIR`, or `--preset llava-7b --write-config DIR`), and times `model.generate` the same way: a prompt
of BOS + image positions + 20 text tokens, best of N runs, prefill = a 1-token generate, decode = the rest.

    pip install torch transformers
    python3 scripts/bench_torch.py --config tiny.json --threads 1
    python3 scripts/bench_torch.py --config llava-7b.json --device cuda --dtype bf16 --batches 1,8,32 --json gen.json

On CUDA the model is built directly on the GPU in --dtype (torch's default dtype set while the modules are made, as
`from_pretrained` does), every timing is bracketed by `torch.cuda.synchronize()`, and the peak of
`torch.cuda.max_memory_allocated()` (counted from after the build) is reported per batch and overall. --json
writes every figure to FILE.
"""
import argparse
import json
import os
import re
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def build(config_path, device, dtype):
    """Random-weight LLaVA of `config_path`, created on `device` directly in `dtype` (as `from_pretrained` with a
    dtype does: torch's default dtype set while the modules are made), so no f32 copy of the model is ever made."""
    cfg = LlavaConfig(**json.load(open(config_path)))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(DTYPES[dtype]).eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return cfg, model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="llava-hf config.json written by `bpo bench generate --write-config`")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=list(DTYPES), default="f32")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads); CPU only")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="each figure is the best of this many runs")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes, e.g. 1,8,32")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else sampled with top-p 0.95")
    ap.add_argument("--json", help="write all figures to this file")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    if not (a.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", a.device)):
        raise SystemExit(f"--device {a.device}: expected cpu, cuda or cuda:N")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: torch sees no CUDA device")
    if cuda:
        torch.cuda.set_device(torch.device(a.device))
    else:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    cfg, model = build(a.config, a.device, a.dtype)
    build_s = time.perf_counter() - t0
    dt = DTYPES[a.dtype]
    v = cfg.vision_config
    n_img = (v.image_size // v.patch_size) ** 2
    image_token = getattr(cfg, "image_token_id", None)
    if image_token is None:
        image_token = cfg.image_token_index
    ids = [1] + [image_token] * n_img + list(range(10, 30))

    def write(figures):
        if not a.json:
            return
        out = {"tool": "pytorch", "bench": "generate", "torch": torch.__version__,
               "transformers": __import__("transformers").__version__, "config": a.config,
               "device": a.device, "device_name": torch.cuda.get_device_name() if cuda else "cpu",
               "dtype": a.dtype, "attn_implementation": getattr(model.config, "_attn_implementation", None),
               "repeats": a.repeats, "build_s": build_s, "figures": figures}
        if cuda:
            out["peak_memory_bytes"] = max(f["peak_memory_bytes"] for f in figures) if figures else None
            out["peak_memory_reserved_bytes"] = max(f["peak_memory_reserved_bytes"] for f in figures) if figures else None
        with open(a.json + ".partial", "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(a.json + ".partial", a.json)

    figures = []
    warm = False
    for b in [int(x) for x in a.batches.replace(" ", ",").split(",") if x]:
        inp = torch.tensor([ids] * b, device=a.device)
        px = torch.randn(b, 3, v.image_size, v.image_size, device=a.device, dtype=dt)
        mask = torch.ones_like(inp)
        kw = dict(do_sample=a.temperature > 0, max_new_tokens=1, min_new_tokens=1, eos_token_id=None, pad_token_id=0)
        if a.temperature > 0:
            kw.update(temperature=a.temperature, top_p=0.95)

        def run(n):
            kw.update(max_new_tokens=n, min_new_tokens=n)
            with torch.no_grad():
                model.generate(input_ids=inp, pixel_values=px, attention_mask=mask, **kw)

        def best(n):
            t = float("inf")
            for _ in range(max(a.repeats, 1)):
                sync()
                s = time.perf_counter()
                run(n)
                sync()
                t = min(t, time.perf_counter() - s)
            return t

        if cuda and not warm:  # CUDA context, cuBLAS handles and kernel loading out of the first timing
            run(2)
            sync()
            warm = True
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        pre, full = best(1), best(a.new_tokens)
        f = {"batch": b, "prompt_tokens": len(ids), "new_tokens": a.new_tokens,
             "sampling": "sample" if a.temperature > 0 else "greedy",
             "prefill_tok_s": b * len(ids) / pre,
             "decode_tok_s": b * (a.new_tokens - 1) / max(full - pre, 1e-9),
             "end_to_end_tok_s": b * a.new_tokens / full,
             "prefill_s": pre, "full_s": full}
        if not cuda:
            f["threads"] = a.threads
        if cuda:
            f["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            f["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
        figures.append(f)
        print(json.dumps(f), flush=True)
        write(figures)  # after every batch: a run stopped by a time limit keeps the batches it finished


if __name__ == "__main__":
    main()
