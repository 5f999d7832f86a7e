#!/usr/bin/env python3
"""PyTorch + peft baseline for `bpo bench train` (dev-only; not run by the tests).

The same DPO step as bpo's benchmark, the way TRL computes it: random-weight LLaVA from the config.json that
`bpo bench train --size S --write-config FILE` (or `--preset llava-7b --layers N --write-config FILE`) writes;
--batch-pairs pairs (default 4 = 8 rows) of BOS + image positions + --prompt-tokens (9) prompt tokens +
--answer-tokens (9) answer tokens + EOS; LoRA (peft, default r 8,
alpha 2 x r) on the language model's --targets (default q,k,v,o; the paper's recipe is q,k,v,o,gate,up,down);
policy forward with gradients over the full logits, reference forward with adapters disabled under no_grad (each
row carries its image, as TRL's collator repeats images for chosen and rejected), sigmoid DPO loss, backward,
AdamW. Prints the median seconds per step after one warm-up step, tokens/s and pairs/s.

    pip install torch transformers peft
    bpo bench train --size small --write-config small.json
    python3 scripts/bench_torch_train.py --config small.json --threads 1
    # 7B widths, 2 decoder layers, rows of 730 positions, with gradient checkpointing, peak memory on the CPU:
    bpo bench train --preset llava-7b --layers 2 --write-config 7b-2.json
    python3 scripts/bench_torch_train.py --config 7b-2.json --prompt-tokens 52 --answer-tokens 100 --lora-rank 64 \
        --targets q,k,v,o,gate,up,down --lora-dropout 0.05 --gradient-checkpointing --threads 2
    python3 scripts/bench_torch_train.py --config llava-7b.json --device cuda --dtype bf16 --lora-rank 64 \
        --targets q,k,v,o,gate,up,down --peak-tflops 989 --json train.json

On CUDA the model is built directly on the GPU in --dtype (torch's default dtype set while the modules are made,
as `from_pretrained` with a dtype does; peft keeps the LoRA weights in f32, as bpo keeps f32 master copies), each
step is bracketed by `torch.cuda.synchronize()`, and the peak `torch.cuda.max_memory_allocated()` over the steps
(the model included) is reported. On the CPU, the resident set's peak (VmHWM) over the steps and its growth over
the resident set after the build, measured as `bpo bench train` measures its own.

--gradient-checkpointing turns on transformers' gradient checkpointing of the language model's decoder layers (the
vision tower is frozen and runs without a graph), non-reentrant (`use_reentrant=False`), as TRL recommends.

MFU: `model_flops_per_step` is an estimate of the matmul and attention FLOPs the step must do: the policy and
reference forwards (vision tower, projector and language model with full-vocabulary logits, each row with its image)
plus the policy backward through the language model for input gradients only (frozen weights get none; LoRA's own
weight gradients are left out as negligible), attention counted without causal halving. With --peak-tflops (the
card's dense bf16 peak in TFLOP/s), mfu = model_flops_per_step / s_per_step / peak. scripts/gpu-check.sh prefers
bpo's own FLOP count when bpo reports one, so both MFUs share a numerator.
"""
import argparse
import json
import re
import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlavaConfig, LlavaForConditionalGeneration

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def status_bytes(field):
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss():
    """Frees what the allocator holds and restarts VmHWM from the current RSS (Linux 4.0+), as bpo's probe does."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def flop_estimate(model, cfg, rows, length, n_img):
    """Matmul + attention FLOPs of one LoRA-DPO step (see the module docstring)."""
    lin = {"vision": 0, "projector": 0, "lm": 0}
    conv = 0
    for name, m in model.named_modules():
        part = "vision" if "vision_tower" in name else "projector" if "multi_modal_projector" in name else "lm"
        if isinstance(m, torch.nn.Linear):
            lin[part] += m.weight.numel()
        elif isinstance(m, torch.nn.Conv2d) and part == "vision":
            conv += m.weight.numel()
    v, t = cfg.vision_config, cfg.text_config
    vis_pos = n_img + 1  # class token
    f_vis = 2 * lin["vision"] * vis_pos + 2 * conv * n_img + 4 * v.num_hidden_layers * vis_pos ** 2 * v.hidden_size
    f_proj = 2 * lin["projector"] * n_img
    f_lm = 2 * lin["lm"] * length + 4 * t.num_hidden_layers * length ** 2 * t.hidden_size
    return 2 * rows * (f_vis + f_proj) + 3 * rows * f_lm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="llava-hf config.json written by `bpo bench train --write-config`")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=list(DTYPES), default="f32", help="dtype of the frozen weights and activations")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads); CPU only")
    ap.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    ap.add_argument("--batch-pairs", type=int, default=4, help="pairs per step (2 rows each)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=None, help="default 2 x rank")
    ap.add_argument("--targets", nargs="+", default=["q,k,v,o"],
                    help="LoRA targets in the language model: q k v o gate up down (comma- or space-separated)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--prompt-tokens", type=int, default=9, help="prompt tokens after BOS and the image positions")
    ap.add_argument("--answer-tokens", type=int, default=9, help="answer tokens before the EOS")
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
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
    targets = [x for t in a.targets for x in t.split(",") if x]
    modules = [TARGETS.get(x, x) for x in targets]
    alpha = a.lora_alpha if a.lora_alpha is not None else 2.0 * a.lora_rank
    dt = DTYPES[a.dtype]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    cfg = LlavaConfig(**json.load(open(a.config)))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # made in --dtype directly, as from_pretrained with a dtype does: no f32 copy
    try:
        with torch.device(a.device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dt)
    v = cfg.vision_config
    n_img = (v.image_size // v.patch_size) ** 2
    image_token = getattr(cfg, "image_token_id", None)
    if image_token is None:
        image_token = cfg.image_token_index
    pairs = a.batch_pairs
    rows, prompt_len = [], 1 + n_img + a.prompt_tokens
    vocab = cfg.text_config.vocab_size

    def word(i):
        return 5 + i % (vocab - 5)

    for side in range(2):
        for p in range(pairs):
            answer = [word(100 + 200 * side + p + i) for i in range(a.answer_tokens)] + [2]
            rows.append([1] + [image_token] * n_img + [word(10 + p + i) for i in range(a.prompt_tokens)] + answer)
    flops = flop_estimate(model, cfg, len(rows), len(rows[0]), n_img)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model = get_peft_model(model, LoraConfig(r=a.lora_rank, lora_alpha=alpha, lora_dropout=a.lora_dropout,
                                             target_modules=r".*language_model.*\.(" + "|".join(modules) + ")"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SystemExit(f"no LoRA module matched targets {modules}")
    ids = torch.tensor(rows, device=a.device)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    pixels = torch.randn(pairs, 3, v.image_size, v.image_size, device=a.device, dtype=dt).repeat(2, 1, 1, 1)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(trainable, lr=a.lr)
    sync()
    build_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        rss_after_build = status_bytes("VmRSS")
        reset_peak_rss()

    def logps(logits):
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        tgt = labels[:, 1:]
        keep = tgt != -100
        return (lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep).sum(1)

    times, losses = [], []
    for step in range(a.steps + 1):
        sync()
        start = time.perf_counter()
        policy = logps(model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits)
        with torch.no_grad(), model.disable_adapter():
            ref = logps(model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits)
        d = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
        loss = -F.logsigmoid(0.1 * d).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step > 0:
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    med = statistics.median(times)
    out = {"threads": a.threads if not cuda else None, "rows": len(rows), "length": ids.shape[1], "pairs": pairs,
           "s_per_step": med, "tokens_per_s": ids.numel() / med, "pairs_per_s": pairs / med,
           "model_flops_per_step": flops, "tflops": flops / med / 1e12}
    if a.peak_tflops:
        out["mfu"] = flops / med / (a.peak_tflops * 1e12)
    out["gradient_checkpointing"] = a.gradient_checkpointing
    out["lora_dropout"] = a.lora_dropout
    if cuda:
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
    else:
        peak = max(status_bytes("VmHWM"), rss_after_build)
        out.update({"rss_after_build_bytes": rss_after_build, "peak_rss_bytes": peak,
                    "peak_rss_growth_bytes": peak - rss_after_build})
    print(json.dumps(out), flush=True)
    if a.json:
        out.update({"tool": "pytorch+peft", "bench": "train", "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__,
                    "config": a.config, "device": a.device,
                    "device_name": torch.cuda.get_device_name() if cuda else "cpu", "dtype": a.dtype,
                    "attn_implementation": getattr(cfg, "_attn_implementation", None),
                    "lora_rank": a.lora_rank, "lora_alpha": alpha, "targets": targets,
                    "adapter_dtype": str(trainable[0].dtype).replace("torch.", ""),
                    "trainable_parameters": sum(p.numel() for p in trainable),
                    "steps": len(times), "step_seconds": times, "losses": losses, "build_s": build_s,
                    "peak_tflops": a.peak_tflops})
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
