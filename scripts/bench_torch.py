"""PyTorch + transformers baseline for `bpo bench generate` (dev-only; not run by the tests).

Builds random-weight LLaVA models from the same config.json that bpo's benchmark uses (`bpo bench generate --size S
--write-config FILE`), and times `model.generate` the same way: a prompt of BOS + image positions + 20 text tokens,
best of N runs, prefill = a 1-token generate, decode = the rest.

    pip install torch transformers
    python3 scripts/bench_torch.py --config tiny.json --threads 1
"""
import argparse, json, time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--temperature", type=float, default=0.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlavaConfig(**json.load(open(a.config)))
    model = LlavaForConditionalGeneration(cfg).eval()
    v = cfg.vision_config
    n_img = (v.image_size // v.patch_size) ** 2
    ids = [1] + [cfg.image_token_index] * n_img + list(range(10, 30))
    for b in [int(x) for x in a.batches.split(",")]:
        inp = torch.tensor([ids] * b)
        px = torch.randn(b, 3, v.image_size, v.image_size)
        kw = dict(do_sample=a.temperature > 0, max_new_tokens=1, min_new_tokens=1, eos_token_id=None, pad_token_id=0)
        if a.temperature > 0:
            kw.update(temperature=a.temperature, top_p=0.95)

        def best(n):
            kw.update(max_new_tokens=n, min_new_tokens=n)
            t = float("inf")
            for _ in range(a.repeats):
                s = time.perf_counter()
                with torch.no_grad():
                    model.generate(input_ids=inp, pixel_values=px, attention_mask=torch.ones_like(inp), **kw)
                t = min(t, time.perf_counter() - s)
            return t

        pre, full = best(1), best(a.new_tokens)
        print(json.dumps({"batch": b, "prompt_tokens": len(ids), "threads": a.threads,
                          "prefill_tok_s": b * len(ids) / pre,
                          "decode_tok_s": b * (a.new_tokens - 1) / max(full - pre, 1e-9),
                          "end_to_end_tok_s": b * a.new_tokens / full}))


if __name__ == "__main__":
    main()
