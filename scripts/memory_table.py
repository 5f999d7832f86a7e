#!/usr/bin/env python3
"""Projects the memory of a full-depth LoRA-DPO step (LLaVA-1.5 7B and 13B) from `bpo bench train` measurements at
the real widths with the decoder cut to two and four layers (dev-only; docs/gpu.md's memory table).

Reads, from DIR, the JSON of four runs per dtype (one process each, so that every peak is the run's own):

    for L in 2 4; do for ck in off on; do
      bpo bench train --preset llava-7b --layers $L --dtype bf16 --pairs 4 --prompt-words 52 --answer-words 100 \\
        --lora-rank 64 --targets q k v o gate up down --lora-dropout 0.05 --steps 1 --gradient-checkpointing $ck \\
        --json DIR/bpo-bf16-L$L-ck$ck.json
    done; done
    python3 scripts/memory_table.py DIR --dtype bf16

From them: per decoder layer, the activation bytes a step keeps without checkpointing and with it (the heap's peak
growth at four layers minus at two, halved), the bytes of the layer's weights, LoRA and optimizer state (the set-up
bytes at four minus two), and the fixed parts (what two layers leave once their per-layer parts are taken off).
Then, for other batch sizes and row lengths and for 13B's widths, the per-layer activations are scaled by an
op-by-op count of what the generic path keeps (the measured-over-counted ratio at the measured shape carried
along), and the fixed parts by the answer positions they hold (the logits). Prints the measured components and a
markdown table against 24, 48, 80 and 141 GB cards: the GB left ("tight" when under a tenth of the card), or "no".
"""
import argparse
import json
import os

GIB = 1 << 30
SHAPES = {  # hidden, intermediate, heads, layers, vocabulary
    "7b": (4096, 11008, 32, 32, 32064),
    "13b": (5120, 13824, 40, 40, 32064),
}
IMAGE = 576  # LLaVA-1.5's image positions (336 px / 14 px patches, squared)
RANK, TARGETS = 64, 7


def heap(report):
    f = report["rows"][0]["figures"]
    return f["memory"]["heap_peak_growth_bytes"], f["setup_bytes"], f["length"]


def counted_layer_bytes(shape, pairs, prompt, answer, d=2):
    """What one decoder layer's forward keeps for the backward pass on bpo's generic path, op by op: the layer's
    input and hidden-sized outputs (norms, q/k/v and their rotations, the copy of v, attention output and its copy,
    o_proj, the residual sum), the MLP's gate, up and product, the answer rows' copies of their prompt's keys and
    values, and per attention score its input (compute dtype), f32 probabilities and their cast."""
    h, i, heads = shape[0], shape[1], shape[2]
    n = pairs * prompt + 2 * pairs * answer
    scores = heads * (pairs * prompt**2 + 2 * pairs * answer * (prompt + answer))
    kv = 2 * (2 * pairs * prompt + 2 * pairs * (prompt + answer)) * h * d
    return d * (14 * n * h + 3 * n * i) + (d + 4 + d) * scores + kv


def setup_bytes(shape, layers, d=2):
    """Weights in the compute dtype (decoder, embeddings, head, CLIP ViT-L/14-336 and projector) plus LoRA r 64 on
    every projection as f32 masters with AdamW's moments, accumulation buffer and decay mask (5 x 4 bytes)."""
    h, i, _, _, vocab = shape
    layer = (4 * h * h + 3 * h * i) * d + RANK * (4 * 2 * h + 2 * (h + i) + (i + h)) * 20
    clip = 24 * (4 * 1024 * 1024 + 2 * 1024 * 4096) + 3 * 14 * 14 * 1024 + 577 * 1024
    projector = 1024 * h + h * h
    return layers * layer + (2 * vocab * h + clip + projector) * d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--dtype", default="bf16")
    a = ap.parse_args()
    r = {(L, ck): heap(json.load(open(os.path.join(a.dir, f"bpo-{a.dtype}-L{L}-ck{ck}.json"))))
         for L in (2, 4) for ck in ("off", "on")}
    length = r[(2, "off")][2]
    answer = 101  # 100 words + EOS
    prompt = length - answer
    layer_off = (r[(4, "off")][0] - r[(2, "off")][0]) / 2
    layer_on = (r[(4, "on")][0] - r[(2, "on")][0]) / 2
    setup_layer = (r[(4, "on")][1] - r[(2, "on")][1]) / 2
    setup_fixed = r[(2, "on")][1] - 2 * setup_layer
    fixed_off = r[(2, "off")][0] - 2 * layer_off
    fixed_on = r[(2, "on")][0] - 2 * layer_on  # the fixed part and the recomputation of one layer
    d = 2 if a.dtype in ("bf16", "f16") else 4
    counted = counted_layer_bytes(SHAPES["7b"], 4, prompt, answer, d)
    k = layer_off / counted
    print(f"measured ({a.dtype}, 7B widths, 4 pairs x {length} positions):")
    print(f"  activations kept per layer: {layer_off / GIB:.3f} GiB without checkpointing, "
          f"{layer_on / GIB:.4f} GiB with it ({100 * layer_on / layer_off:.1f}%)")
    print(f"  counted op by op: {counted / GIB:.3f} GiB per layer (measured / counted = {k:.3f})")
    print(f"  fixed: {fixed_off / GIB:.2f} GiB without checkpointing; with it, fixed + one layer recomputed "
          f"{fixed_on / GIB:.2f} GiB")
    print(f"  set-up per layer {setup_layer / GIB:.3f} GiB (counted {setup_bytes(SHAPES['7b'], 1, d) / GIB - setup_bytes(SHAPES['7b'], 0, d) / GIB:.3f}), "
          f"without layers {setup_fixed / GIB:.2f} GiB (counted {setup_bytes(SHAPES['7b'], 0, d) / GIB:.2f})")
    print()
    print("| model | pairs | row positions | checkpointing | projected peak (GB) | 24 GB | 48 GB | 80 GB | 141 GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        layers = shape[3]
        ratio_setup = setup_bytes(shape, layers, d) / setup_bytes(SHAPES["7b"], 32, d)
        setup = (setup_fixed + 32 * setup_layer) * ratio_setup
        for pairs in (1, 4, 8):
            for length_ in (730, 1024):
                ans = length_ - prompt  # the prompt (image + question) stays, the answers grow
                per = k * counted_layer_bytes(shape, pairs, prompt, ans, d)
                scale_fixed = (pairs * ans * shape[0]) / (4 * answer * 4096)
                for ck in ("off", "on"):
                    if ck == "off":
                        act = fixed_off * scale_fixed + layers * per
                    else:
                        n = pairs * prompt + 2 * pairs * ans
                        saved = n * shape[0] * d
                        recompute = per + (fixed_on - layer_off) * scale_fixed
                        act = recompute + layers * saved
                    total = (setup + act) / 1e9
                    cells = []
                    for card in (24, 48, 80, 141):
                        spare = card - total
                        # The CUDA context (about 0.5 GB) and the allocator's slack come out of the spare.
                        if spare <= 0:
                            cells.append("no")
                        else:
                            cells.append(f"{spare:.0f} spare" + (" (tight)" if spare < 0.1 * card else ""))
                    print(f"| {name} | {pairs} | {length_} | {ck} | {total:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
