#!/usr/bin/env python3
"""PyTorch + peft baseline for `bpo bench train` (dev-only; not run by the tests).

The same DPO step as bpo's benchmark, the way TRL computes it: random-weight LLaVA from the config.json that
`bpo bench train --size S --write-config FILE` writes; 4 pairs = 8 rows of BOS + image positions + 9 prompt
tokens + 10 answer tokens; LoRA r 8 (alpha 16) on q/k/v/o of the language model (peft); policy forward with
gradients over the full logits, reference forward with adapters disabled under no_grad (each row carries its
image, as TRL's collator repeats images for chosen and rejected), sigmoid DPO loss, backward, AdamW. Prints the
median seconds per step after one warm-up step, and tokens/s.

    pip install torch transformers peft
    bpo bench train --size small --write-config small.json
    python3 scripts/bench_torch_train.py --config small.json --threads 1
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlavaConfig, LlavaForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlavaConfig(**json.load(open(a.config)))
    model = LlavaForConditionalGeneration(cfg)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"))
    v = cfg.vision_config
    n_img = (v.image_size // v.patch_size) ** 2
    rows, prompt_len = [], 1 + n_img + 9
    for side in range(2):
        for p in range(4):
            answer = [100 + 100 * side + p + i for i in range(9)] + [2]
            rows.append([1] + [cfg.image_token_index] * n_img + [10 + p + i for i in range(9)] + answer)
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    pixels = torch.randn(4, 3, v.image_size, v.image_size).repeat(2, 1, 1, 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def logps(logits):
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        tgt = labels[:, 1:]
        mask = tgt != -100
        return (lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(1)

    times = []
    for step in range(a.steps + 1):
        start = time.perf_counter()
        policy = logps(model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits)
        with torch.no_grad(), model.disable_adapter():
            ref = logps(model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits)
        d = (policy[:4] - ref[:4]) - (policy[4:] - ref[4:])
        loss = -F.logsigmoid(0.1 * d).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step > 0:
            times.append(time.perf_counter() - start)
    med = statistics.median(times)
    print(json.dumps({"threads": a.threads, "rows": 8, "length": ids.shape[1], "s_per_step": med, "tokens_per_s": ids.numel() / med}))


if __name__ == "__main__":
    main()
