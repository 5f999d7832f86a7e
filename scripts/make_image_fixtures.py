#!/usr/bin/env python3
"""Regenerate tests/fixtures/images/ (dev-only; tests never run this).

Copies the test photographs from ../shared/data/images, cuts small crops (non-square, RGBA, grayscale) from them,
and writes the pixel tensors transformers produces for them to expected.safetensors (f16, CHW), named
`<stem>/<variant>`. The reference is transformers' PIL backend (`CLIPImageProcessorPil`, what `use_fast=False` or
`backend="pil"` selects in transformers 5.x; plain `CLIPImageProcessor` is now the torchvision backend and only
falls back to PIL when torchvision is missing), i.e. PIL's `Image.resize(..., BICUBIC)`. `pad` variants first run
LLaVA-1.5's `expand2square` with fill `tuple(int(x * 255) for x in image_mean)`, as LLaVA's own code does.

Also writes jpeg/: small JPEG variants (chroma subsampling, progressive, grayscale, CMYK, restart markers) saved
by Pillow, and jpeg/decoded.safetensors with the pixels Pillow decodes from each (`convert("RGB")`, u8, HWC),
to check that JPEG decoding matches Pillow's libjpeg-turbo exactly.

Usage: python3 scripts/make_image_fixtures.py [--shared DIR] [--out tests/fixtures/images] [--dtype f16|f32]
  --shared defaults to the first of ../shared and ../../shared that exists; --dtype f32 writes
  expected_f32.safetensors, for measuring the exact error of the Rust port (not for committing).
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image
from safetensors.numpy import save_file
from transformers import CLIPImageProcessorPil

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]

# LLaVA-1.5's preprocessor_config.json (llava-hf/llava-1.5-7b-hf), and a tiny 36-px variant for the crops.
LLAVA_336 = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
# Older checkpoints (openai/clip-vit-large-patch14-336) write plain ints; this file also leaves fields out so the
# Rust side must fill transformers' defaults.
TINY_36 = {"size": 36, "crop_size": 36, "resample": 3}


SOURCES = """# Image fixtures

Made by `scripts/make_image_fixtures.py` (transformers 5.24, Pillow 13.0); rerun it to regenerate.

| file | what | origin, licence |
|---|---|---|
| astronaut.png | 512x512 RGB, astronaut Eileen Collins | scikit-image 0.25.2 data, public domain (NASA) |
| chelsea.png | 451x300 RGB, a cat | scikit-image 0.25.2 data, CC0 (Stefan van der Walt) |
| coffee.png | 600x400 RGB, a cup of coffee | scikit-image 0.25.2 data, CC0 (Rachel Michetti) |
| rocket.jpg | 640x427 RGB JPEG, a Falcon 9 launch | scikit-image 0.25.2 data, public domain (SpaceX) |
| small.png | 50x37 crop of chelsea.png | as chelsea.png |
| tiny.png | 20x13 crop of chelsea.png (upscaled by the 36-px processor) | as chelsea.png |
| alpha.png | 30x40 RGBA crop of chelsea.png with a horizontal alpha ramp | as chelsea.png |
| gray.png | 40x25 grayscale crop of chelsea.png | as chelsea.png |
| preprocessor_336.json | LLaVA-1.5's `preprocessor_config.json` (llava-hf/llava-1.5-7b-hf) | |
| preprocessor_36.json | a tiny config in the old integer form, other fields left to the defaults | |
| jpeg/*.jpg | 67x45 crop of rocket.jpg saved by Pillow as 4:2:0, 4:2:2, 4:4:4, progressive 4:2:0, progressive 4:2:2 (q 95), optimised with restart markers, grayscale, CMYK; damaged.jpg is q75_420.jpg with 16 bytes of its scan zeroed | as rocket.jpg |
| jpeg/decoded.safetensors | Pillow's (bundled libjpeg-turbo 3.2.0) `np.asarray(Image.open(f).convert("RGB"))` (u8, HWC) for each `jpeg/<stem>.jpg` | computed by the script |
| expected.safetensors | transformers' `pixel_values` (f16, CHW) for each image: `<stem>/pad` (LLaVA's `expand2square`, then the processor) and `<stem>/square`; photos with the 336 config, crops with the 36 config; plus `small/square_bilinear` (resample 2) and `small/square_nocrop` (no centre crop, 36x48) | computed by the script |

The four photographs were copied from the project's shared data folder, which took them from the data folder of
the scikit-image 0.25.2 wheel (licences as given in scikit-image's docstrings).
"""


# JPEG variants: (file stem, mode, Pillow save options).
JPEGS = [
    ("q75_420", "RGB", {"quality": 75, "subsampling": 2}),
    ("q75_422", "RGB", {"quality": 75, "subsampling": 1}),
    ("q90_444", "RGB", {"quality": 90, "subsampling": 0}),
    ("q75_420_progressive", "RGB", {"quality": 75, "subsampling": 2, "progressive": True}),
    ("q95_422_progressive", "RGB", {"quality": 95, "subsampling": 1, "progressive": True}),
    ("q60_420_optimized_restart", "RGB", {"quality": 60, "optimize": True, "restart_marker_blocks": 3}),
    ("gray", "L", {"quality": 85}),
    ("cmyk", "CMYK", {"quality": 85}),
]


def jpeg_variants(out, photo):
    """Saves JPEG variants of a small odd-sized crop and the pixels Pillow decodes from them."""
    (out / "jpeg").mkdir(exist_ok=True)
    crop = Image.open(photo).convert("RGB").crop((300, 150, 367, 195))
    decoded = {}
    for stem, mode, opts in JPEGS:
        path = out / "jpeg" / f"{stem}.jpg"
        crop.convert(mode).save(path, **opts)
        decoded[stem] = np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB")))
    # Damaged entropy-coded data (end marker intact): libjpeg warns and decodes on, and so must we.
    data = bytearray((out / "jpeg/q75_420.jpg").read_bytes())
    mid = (data.index(b"\xff\xda") + len(data)) // 2  # halfway through the scan
    data[mid : mid + 16] = bytes(16)
    (out / "jpeg/damaged.jpg").write_bytes(bytes(data))
    decoded["damaged"] = np.ascontiguousarray(np.asarray(Image.open(out / "jpeg/damaged.jpg").convert("RGB")))
    save_file(decoded, str(out / "jpeg/decoded.safetensors"))
    (out / "jpeg/decoded.safetensors").chmod(0o644)


def expand2square(img, fill):
    """LLaVA-1.5's expand2square (llava/mm_utils.py), verbatim in behaviour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, (0, (side - h) // 2) if w > h else ((side - w) // 2, 0))
    return out


def run(proc, img, pad):
    if pad:
        # transformers' own RGB conversion (transparency composited on white); LLaVA's .convert("RGB") differs
        # only for images with an alpha channel.
        img = Image.fromarray(transformers.image_transforms.convert_to_rgb(img, return_numpy=True))
        img = expand2square(img, tuple(int(x * 255) for x in proc.image_mean))
    return proc(images=img, return_tensors="np")["pixel_values"][0]


def main():
    ap = argparse.ArgumentParser()
    root = Path(__file__).resolve().parent.parent
    shared = next((d for d in [root.parent / "shared", root.parent.parent / "shared"] if d.is_dir()), None)
    ap.add_argument("--shared", type=Path, default=shared, help="the shared/ folder (default: ../shared)")
    ap.add_argument("--out", type=Path, default=root / "tests/fixtures/images")
    ap.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.float16 if args.dtype == "f16" else np.float32

    (out / "SOURCES.md").write_text(SOURCES)
    src = args.shared / "data/images"
    for name in PHOTOS:
        shutil.copyfile(src / name, out / name)

    # Small crops, cut from the committed photos: a non-square one (50x37, downscaled to 36 px), a tiny one
    # (20x13, upscaled), an RGBA one with an alpha ramp (transparency is composited on white) and a grayscale one.
    chelsea = Image.open(out / "chelsea.png").convert("RGB")
    chelsea.crop((200, 80, 250, 117)).save(out / "small.png")
    chelsea.crop((150, 100, 170, 113)).save(out / "tiny.png")
    rgba = chelsea.crop((260, 120, 290, 160)).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 30).astype(np.uint8), (40, 1))))
    rgba.save(out / "alpha.png")
    chelsea.crop((100, 50, 140, 75)).convert("L").save(out / "gray.png")

    jpeg_variants(out, out / "rocket.jpg")

    (out / "preprocessor_336.json").write_text(json.dumps(LLAVA_336, indent=2) + "\n")
    (out / "preprocessor_36.json").write_text(json.dumps(TINY_36, indent=2) + "\n")
    p336 = CLIPImageProcessorPil(**LLAVA_336)
    p36 = CLIPImageProcessorPil(**TINY_36)
    p36_bilinear = CLIPImageProcessorPil(**{**TINY_36, "resample": 2})
    p36_nocrop = CLIPImageProcessorPil(**{**TINY_36, "do_center_crop": False})

    tensors = {}
    for name in PHOTOS:
        img = Image.open(out / name)
        stem = Path(name).stem
        tensors[f"{stem}/pad"] = run(p336, img, True)
        tensors[f"{stem}/square"] = run(p336, img, False)
    for stem in ["small", "tiny", "alpha", "gray"]:
        img = Image.open(out / f"{stem}.png")
        tensors[f"{stem}/pad"] = run(p36, img, True)
        tensors[f"{stem}/square"] = run(p36, img, False)
    small = Image.open(out / "small.png")
    tensors["small/square_bilinear"] = run(p36_bilinear, small, False)
    tensors["small/square_nocrop"] = run(p36_nocrop, small, False)

    tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}
    # No metadata: safetensors writes it in random order, which would make regeneration change the file.
    print(f"transformers {transformers.__version__}, Pillow {PIL.__version__}, CLIPImageProcessorPil")
    save_file(tensors, str(out / f"expected{'' if args.dtype == 'f16' else '_f32'}.safetensors"))
    (out / f"expected{'' if args.dtype == 'f16' else '_f32'}.safetensors").chmod(0o644)
    for k, v in sorted(tensors.items()):
        print(f"{k:24s} {tuple(v.shape)} min {v.min():+.4f} max {v.max():+.4f}")


if __name__ == "__main__":
    main()
