#!/usr/bin/env python3
"""Build the tiny random-weight test checkpoints and the reference outputs under tests/fixtures/.

Dev-only: the Rust tests read the files this writes; nothing at run time calls Python.

Run from the repository root:

    python3 scripts/make_fixtures.py

Requirements (CPU is enough; versions used for the committed files are recorded in tests/fixtures/SOURCES.md):

    pip install torch transformers tokenizers safetensors

It writes (everything fp32, ids int64, fixed seeds, so re-running gives the same bytes):

- tests/fixtures/tokenizer/        Llama-style BPE tokenizer (byte fallback, Metaspace), 1024 ids incl. <image>, <pad>
- tests/fixtures/llava-tiny/       LlavaForConditionalGeneration in the llava-hf layout with the OLD tensor names
                                   (language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
                                   multi_modal_projector.linear_{1,2}.*)
- tests/fixtures/llama-tiny/       LlamaForCausalLM, tied embeddings (no lm_head tensor), llama3 rope scaling
- tests/fixtures/llava-tiny-ref.safetensors, llama-tiny-ref.safetensors   reference tensors (see SOURCES.md)
- tests/fixtures/score-cases.jsonl the scoring rows as strings with their summed log-probabilities

Prompt template (llava-hf chat template, no system text):
    image row:     "USER: <image>\n{prompt} ASSISTANT:"
    text-only row: "USER: {prompt} ASSISTANT:"
Token ids are built by splicing, never by tokenizing "<image>":
    image row:     [1] + enc("USER: ") + [1022] * 16 + enc("\n{prompt} ASSISTANT:")
    text-only row: [1] + enc("USER: {prompt} ASSISTANT:")
    response:      enc(response) + [2]           (the answer is appended right after the prompt ids)
where enc(s) = Tokenizer.from_file("tokenizer.json").encode(s, add_special_tokens=False).ids. Because the
tokenizer's Metaspace pre-tokenizer uses prepend_scheme "first", every enc() call starts its text with "▁".
"""

import json
import os
import random
import shutil
import tempfile

import torch
import transformers
import tokenizers
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
ROOT = os.path.normpath(ROOT)

BOS, EOS, UNK = 1, 2, 0
IMAGE, PAD = 1022, 1023
VOCAB = 1024
N_IMAGE_TOKENS = 16  # (36 // 8) ** 2 patches; CLS dropped by the "default" strategy
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

torch.set_num_threads(1)  # one thread: bit-identical results run to run
torch.use_deterministic_algorithms(True)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray", "silver"]
OBJECTS = ["ball", "cube", "cup", "book", "chair", "table", "dog", "cat", "car", "tree", "lamp", "box", "bottle",
           "bird", "flower", "apple", "banana", "clock", "phone", "bicycle", "person", "horse", "kite", "umbrella",
           "bench", "boat", "train", "bus", "pizza", "vase", "bowl", "laptop", "sign", "window", "door", "bag",
           "sandwich", "carrot", "giraffe", "elephant", "zebra", "sheep", "cow", "bear", "skateboard", "surfboard",
           "frisbee", "toothbrush", "scissors", "keyboard", "mouse", "remote", "oven", "sink", "refrigerator", "bed",
           "couch", "television", "truck", "motorcycle", "airplane", "hat", "shirt", "shoe", "candle", "mirror",
           "pillow", "plate", "fork", "knife", "spoon", "basket", "ladder", "fence", "bridge", "mountain", "river",
           "cloud", "road", "building", "tower", "wall", "floor", "grass", "sand", "snow", "water"]
PEOPLE = ["man", "woman", "boy", "girl", "child", "player", "driver", "chef", "teacher", "farmer", "tourist"]
ACTIONS = ["holding", "riding", "eating", "reading", "throwing", "carrying", "watching", "painting", "cutting",
           "wearing", "pushing", "pulling", "cleaning", "opening", "catching", "sitting on", "standing near"]
TEXTURES = ["wooden", "metal", "plastic", "glass", "striped", "dotted", "shiny", "soft", "wet", "empty", "full",
            "broken", "colorful", "heavy", "light"]
SHAPES = ["circle", "square", "triangle", "star", "rectangle", "hexagon", "diamond", "oval", "cross", "heart"]
SCENES = ["kitchen", "park", "street", "beach", "room", "field", "garden", "office", "forest", "market", "station"]
SIZES = ["small", "large", "big", "tiny", "tall", "short", "round", "flat", "old", "new", "bright", "dark"]
PLACES = ["on", "under", "next to", "behind", "in front of", "near", "above", "beside", "inside", "left of",
          "right of"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "2", "3", "4", "5", "10", "12"]
QUESTIONS = [
    "Describe the image.",
    "What is in the image?",
    "Answer the question using a single word or phrase.",
    "Describe this image in detail.",
    "What do you see?",
]


def corpus():
    """A few hundred deterministic English sentences about objects, colours, shapes and scenes."""
    rng = random.Random(20240601)
    c, o, s, sc, sz, p, n, who, act, tx = (lambda xs=xs: rng.choice(xs) for xs in (
        COLOURS, OBJECTS, SHAPES, SCENES, SIZES, PLACES, NUMBERS, PEOPLE, ACTIONS, TEXTURES))
    templates = [
        lambda: f"There is a {sz()} {c()} {o()} {p()} the {o()}.",
        lambda: f"A {c()} {s()} is drawn on the {o()}.",
        lambda: f"The {o()} in the {sc()} is {c()}.",
        lambda: f"Is there a {o()} in the image?",
        lambda: f"Yes, there is a {c()} {o()} in the image.",
        lambda: f"No, there is no {o()} in the image.",
        lambda: f"What color is the {o()}? The {o()} is {c()}.",
        lambda: f"How many {o()}s are there? There are {n()} {o()}s.",
        lambda: f"The image shows a {sc()} with a {sz()} {o()} and a {c()} {o()}.",
        lambda: f"USER: {rng.choice(QUESTIONS)} ASSISTANT: The image shows a {c()} {o()} {p()} a {o()}.",
        lambda: f"In the {sc()}, a {c()} {s()} sits {p()} a {sz()} {o()}.",
        lambda: f"I can see {n()} {c()} {s()}s and a {o()}.",
        lambda: f"The {sz()} {o()} is {p()} the {c()} {o()}, and the {sc()} is quiet.",
        lambda: f"A {who()} is {act()} a {tx()} {o()} in the {sc()}.",
        lambda: f"The {who()} {p()} the {o()} is {act()} a {c()} {o()}.",
        lambda: f"A {tx()} {c()} {o()} lies {p()} a {tx()} {o()}.",
    ]
    out = [f"{q}" for q in QUESTIONS]
    out += [f"The {c_} {o_} is here." for c_ in COLOURS for o_ in OBJECTS[:12]]
    out += [templates[i % len(templates)]() for i in range(700)]
    return out


def build_tokenizer():
    """BPE trained to 1022 ids (unk, s, /s, 256 byte tokens, chars, merges), then <image>=1022 and <pad>=1023."""
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # split=True while training so no merge crosses a word boundary (sentencepiece's split_by_whitespace)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=1022, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  min_frequency=1, show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)

    # Rebuild as Llama-2's tokenizer.json looks: only <unk>/<s>/</s> are added tokens (byte tokens live in the
    # vocab only), Metaspace pre-tokenizer without splitting, Replace/ByteFallback/Fuse/Strip decoder, no
    # post-processor (callers add BOS themselves).
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    spec["normalizer"] = None
    spec["post_processor"] = None
    spec["model"].update({"byte_fallback": True, "fuse_unk": True, "unk_token": "<unk>", "dropout": None,
                          "ignore_merges": False})
    trained = Tokenizer.from_str(json.dumps(spec))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    assert trained.get_vocab_size(with_added_tokens=False) == 1022, trained.get_vocab_size(False)
    trained.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                                AddedToken("<pad>", special=True, normalized=False)])

    assert trained.get_vocab_size(with_added_tokens=True) == VOCAB
    for t, i in [("<unk>", UNK), ("<s>", BOS), ("</s>", EOS), ("<image>", IMAGE), ("<pad>", PAD),
                 ("<0x00>", 3), ("<0x0A>", 13), ("<0xFF>", 258)]:
        assert trained.token_to_id(t) == i, (t, trained.token_to_id(t), i)
    # split=False encodes exactly like the split=True it was trained with
    for line in corpus()[:200] + ["USER: What is in the image? ASSISTANT: a red ball"]:
        assert trained.encode(line, add_special_tokens=False).ids == tok.encode(line, add_special_tokens=False).ids
    # byte fallback and decoding round trip
    probe = "USER: Zebra ü 7\nok"
    ids = trained.encode(probe, add_special_tokens=False).ids
    assert UNK not in ids and trained.decode(ids) == probe, (ids, trained.decode(ids))
    return trained


def write_tokenizer(tok, folder):
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"), pretty=True)

    def added(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): added(t) for i, t in
                                 [(UNK, "<unk>"), (BOS, "<s>"), (EOS, "</s>"), (IMAGE, "<image>"), (PAD, "<pad>")]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "extra_special_tokens": {"image_token": "<image>"},
        "legacy": False,
        "model_max_length": 256,
        "pad_token": "<pad>",
        "padding_side": "left",
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }
    special = {"bos_token": "<s>", "eos_token": "</s>", "image_token": "<image>", "pad_token": "<pad>",
               "unk_token": "<unk>"}
    dump_json(config, os.path.join(folder, "tokenizer_config.json"))
    dump_json(special, os.path.join(folder, "special_tokens_map.json"))
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    probe = "USER: <image>\nIs there a red ball? ASSISTANT: Yes, zebra \u00fc"
    assert hf(probe).input_ids == tok.encode(probe, add_special_tokens=False).ids  # no BOS added by either


def dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------

def init_weights(model, seed, token_std=0.5):
    """Matrices N(0, 1/fan_in), embeddings N(0, 1) (token N(0, token_std)), norm weights U(0.5, 1.5), biases N(0, 0.1)."""
    torch.manual_seed(seed)
    norm_params = set()
    for mname, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
            for pname, _ in m.named_parameters(recurse=False):
                norm_params.add(f"{mname}.{pname}")
    seen = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(remove_duplicate=True)):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name in norm_params and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0.0, token_std)
            elif name.endswith("position_embedding.weight") or name.endswith("class_embedding"):
                p.normal_(0.0, 1.0)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in ** -0.5)
            else:
                raise AssertionError(f"no init rule for {name} {tuple(p.shape)}")


def save_safetensors(tensors, path):
    save_file({k: v.detach().contiguous().clone() for k, v in sorted(tensors.items())}, path,
              metadata={"format": "pt"})


def saved_keys(model):
    """Tensor names transformers' own save_pretrained writes (in a throwaway folder)."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        keys = set()
        for f in files:
            keys |= set(load_file(os.path.join(d, f)).keys())
        with open(os.path.join(d, "config.json")) as f:
            config = json.load(f)
        gen = None
        if os.path.exists(os.path.join(d, "generation_config.json")):
            with open(os.path.join(d, "generation_config.json")) as f:
                gen = json.load(f)
    return sorted(keys), config, gen


# ----------------------------------------------------------------------------------------------------------------
# Helpers for ids and batches
# ----------------------------------------------------------------------------------------------------------------

class Ids:
    def __init__(self, tok):
        self.tok = tok

    def enc(self, s):
        return self.tok.encode(s, add_special_tokens=False).ids

    def prompt(self, prompt, image):
        if image:
            return [BOS] + self.enc("USER: ") + [IMAGE] * N_IMAGE_TOKENS + self.enc(f"\n{prompt} ASSISTANT:")
        return [BOS] + self.enc(f"USER: {prompt} ASSISTANT:")

    def response(self, response):
        return self.enc(response) + [EOS]


def pad_rows(rows, side):
    """Pad id lists with PAD to one length; returns (ids, mask, position_ids) int64 tensors."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask, positions(mask)


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


MIN_MARGIN = 2e-3  # top-1 minus top-2 logit at every greedy step: far above fp32 port error (~1e-5)


def greedy(model, ids, mask, n_new, **extra):
    """generate() greedy, new tokens only, plus a flag saying whether the path is safe to compare against.

    Safe = the raw-logit argmax chose every token (so min_new_tokens never had to block EOS, and a decoder that
    stops at EOS, ignores EOS or forces a minimum length all agree), no EOS/<image>/<pad> was generated, and the
    top-1/top-2 gap stays above MIN_MARGIN so float noise in another implementation cannot flip a choice.
    """
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                         min_new_tokens=n_new, pad_token_id=PAD, eos_token_id=EOS, return_dict_in_generate=True,
                         output_logits=True, **extra)
    new = out.sequences[:, ids.shape[1]:]
    assert new.shape == (ids.shape[0], n_new), new.shape
    raw = torch.stack(out.logits, dim=1)
    top2 = raw.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min().item()
    safe = (torch.equal(raw.argmax(-1), new) and margin > MIN_MARGIN
            and not any(t in new for t in (EOS, IMAGE, PAD)))
    return new, margin, safe


def pick_greedy(model, candidates, n_new, pixel_values=None):
    """Among candidates (lists of prompt-id rows, left-padded together), the safe greedy path with the most
    distinct new tokens (random tiny models love to repeat one token; variety exercises the KV cache better)."""
    best = None
    for rows in candidates:
        ids, mask, _ = pad_rows(rows, "left")
        extra = {} if pixel_values is None else {"pixel_values": pixel_values[:len(rows)]}
        with torch.no_grad():
            new, margin, safe = greedy(model, ids, mask, n_new, **extra)
        distinct = min(len(set(row.tolist())) for row in new)
        if safe and (best is None or distinct > best[0]):
            best = (distinct, rows, ids, mask, new, margin, extra)
    assert best is not None, "no candidate prompt gives a safe greedy path"
    _, rows, ids, mask, new, margin, extra = best
    with torch.no_grad():
        forward_argmax_check(model, ids, mask, new, **extra)
        for i, r in enumerate(rows):  # batched greedy == each row alone
            one = {} if pixel_values is None else {"pixel_values": pixel_values[i:i + 1]}
            solo, _, _ = greedy(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), n_new, **one)
            assert torch.equal(solo[0], new[i]), "batched greedy differs from single-row greedy"
    return ids, mask, new, margin


def forward_argmax_check(model, ids, mask, new, **extra):
    """Full no-cache forward on prompt+generated ids: its argmax must reproduce the generated tokens."""
    seq = torch.cat([ids, new], dim=1)
    m = torch.cat([mask, torch.ones_like(new)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=m, position_ids=positions(m), **extra).logits
    pred = logits[:, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(pred, new), (pred, new)


# ----------------------------------------------------------------------------------------------------------------
# LLaVA
# ----------------------------------------------------------------------------------------------------------------

def llava_config():
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
                       pad_token_id=PAD, hidden_act="silu")
    vision = CLIPVisionConfig(image_size=36, patch_size=8, hidden_size=64, intermediate_size=256,
                              num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, projection_dim=32, num_channels=3)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, pad_token_id=PAD,
                       image_seq_length=N_IMAGE_TOKENS, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       multimodal_projector_bias=True, tie_word_embeddings=False)


def llava_hf_name(key):
    """transformers 5.24 in-memory state-dict name -> the name real llava-hf checkpoints use.

    In memory 5.24 has model.language_model.*, lm_head.*, model.multi_modal_projector.* and a CLIPVisionModel
    WITHOUT its old `vision_model.` level (model.vision_tower.embeddings.*); loading strips that level again.
    """
    for new, old in [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")]:
        if key.startswith(new):
            return old + key[len(new):]
    raise AssertionError(f"unexpected key {key}")


def make_llava(tok):
    folder = os.path.join(ROOT, "llava-tiny")
    os.makedirs(folder, exist_ok=True)
    model = LlavaForConditionalGeneration(llava_config()).eval()
    init_weights(model, seed=1234)

    new_keys, config, gen = saved_keys(model)
    state = model.state_dict()
    renamed = {llava_hf_name(k): v for k, v in state.items()}
    for k in renamed:
        assert k.startswith(("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.linear_",
                             "language_model.lm_head.weight")), k
    # The trap: 5.24's save_pretrained maps the language model and projector back to the old names but writes
    # the vision tower as vision_tower.embeddings.* (no vision_model.); real llava-hf files have the extra level.
    only_saved, only_real = sorted(set(new_keys) - set(renamed)), sorted(set(renamed) - set(new_keys))
    print(f"llava: in-memory names (transformers {transformers.__version__}), e.g. {sorted(state)[0]}")
    print(f"llava: {len(set(new_keys) & set(renamed))} names agree between save_pretrained and real llava-hf, "
          f"{len(only_saved)} differ, e.g.:")
    for a, b in list(zip(only_saved, only_real))[:3]:
        print(f"    save_pretrained: {a}\n    llava-hf:        {b}")
    assert [k.replace("vision_tower.", "vision_tower.vision_model.", 1) for k in only_saved] == only_real
    save_safetensors(renamed, os.path.join(folder, "model.safetensors"))

    # config.json: what save_pretrained writes, plus the classic keys real llava-hf configs carry
    config["architectures"] = ["LlavaForConditionalGeneration"]
    config["model_type"] = "llava"
    config["image_token_index"] = IMAGE
    config["pad_token_id"] = PAD
    config["torch_dtype"] = "float32"  # the key older readers (and real llava-hf files) use; 5.x writes "dtype"
    config["text_config"]["rope_theta"] = 10000.0
    dump_json(config, os.path.join(folder, "config.json"))
    gen = gen or {}
    gen.update({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    dump_json(gen, os.path.join(folder, "generation_config.json"))
    dump_json({
        "crop_size": {"height": 36, "width": 36},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 36},
    }, os.path.join(folder, "preprocessor_config.json"))
    write_tokenizer(tok, folder)

    loaded = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state)
    for k, v in state.items():
        assert torch.equal(v, loaded_state[k]), k
    model.set_attn_implementation("eager")
    return model, loaded, folder


def llava_refs(model, loaded, ids_):
    g = torch.Generator().manual_seed(7)
    pixel_values = torch.randn(2, 3, 36, 36, generator=g) * 0.5

    # --- forward: 3 rows, rows 1-2 left-padded --------------------------------------------------------------
    rows = [
        ids_.prompt("What is in the image?", True) + ids_.enc("A red ball on a table."),
        ids_.prompt("Is there a cat?", True) + ids_.enc("No."),
        ids_.prompt("What color is the sky?", False) + ids_.enc("Blue."),
    ]
    input_ids, mask, pos = pad_rows(rows, "left")
    with torch.no_grad():
        out = loaded(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, position_ids=pos)
        same = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, position_ids=pos)
        assert torch.equal(out.logits, same.logits), "reloaded checkpoint gives different logits"
        logits = out.logits * mask[..., None]  # pad positions carry no meaning: zeroed
        vis = loaded.model.vision_tower(pixel_values, output_hidden_states=True)
        vision_hidden = vis.hidden_states[-2]
        feats = loaded.get_image_features(pixel_values=pixel_values)
        image_features = torch.stack(list(feats.pooler_output))
        # 36 px / patch 8: the stride-8 conv floors to 4x4 = 16 patches (+ CLS)
        assert vision_hidden.shape == (2, 17, 64) and image_features.shape == (2, N_IMAGE_TOKENS, 128)
        manual = loaded.model.multi_modal_projector(vision_hidden[:, 1:])
        assert torch.equal(manual, image_features)
        # rows one at a time without padding agree with the padded batch
        for i, r in enumerate(rows):
            kw = {"pixel_values": pixel_values[i:i + 1]} if IMAGE in r else {}
            single = loaded(input_ids=torch.tensor([r]), **kw).logits[0]
            diff = (single - out.logits[i, -len(r):]).abs().max().item()
            print(f"llava: row {i} single vs padded batch max |diff| = {diff:.2e}")
            assert diff < 1e-4

    # --- greedy: batch 1 with image 0; batch 2 left-padded, row i with image i -----------------------------------
    questions = ["Describe the image.", "What do you see?", "What is in the image?", "Describe this image in detail.",
                 "What color is the ball?", "How many dogs are in the park?", "Is there a red cube on the table?",
                 "Where is the cat?", "What shape is drawn on the box?", "What is the man holding?"]
    gp, _, gids, margin = pick_greedy(loaded, [[ids_.prompt(q, True)] for q in questions], 32, pixel_values)
    print(f"llava: greedy prompt {gp.tolist()}\n       -> {gids.tolist()} (min top1-top2 margin {margin:.4f})")
    # pairs whose lengths differ by at least 4, so row 0 carries real left padding
    pairs = [[ids_.prompt(a, True), ids_.prompt(b, True)] for a in questions for b in questions
             if len(ids_.prompt(a, True)) + 4 <= len(ids_.prompt(b, True))]
    bids, bmask, bnew, bmargin = pick_greedy(loaded, pairs, 16, pixel_values)
    print(f"llava: batched greedy -> {bnew.tolist()} (min margin {bmargin:.4f})")

    # --- scoring rows, right-padded ----------------------------------------------------------------------------
    cases = [
        ("What color is the ball?", "img0", "The ball is red."),
        ("Is there a cat in the image?", "img1", "No, there is no cat in the image."),
        ("Describe a quiet park.", None, "A green tree stands next to a bench."),
    ]
    srows, slabels = [], []
    for prompt, image, response in cases:
        p, r = ids_.prompt(prompt, image is not None), ids_.response(response)
        srows.append(p + r)
        slabels.append([-100] * len(p) + r)
    sids, smask, spos = pad_rows(srows, "right")
    labels = torch.full_like(sids, -100)
    for i, lab in enumerate(slabels):
        labels[i, :len(lab)] = torch.tensor(lab)
    spix = torch.stack([pixel_values[int(img[-1])] for _, img, _ in cases if img])
    with torch.no_grad():
        slogits = loaded(input_ids=sids, pixel_values=spix, attention_mask=smask, position_ids=spos).logits
    logp = torch.log_softmax(slogits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    tok_lp = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt != -100)
    token_logprobs = torch.cat([torch.zeros(len(cases), 1), tok_lp], dim=1)
    sums = token_logprobs.double().sum(-1).float()
    counts = (labels != -100).sum(-1)
    # transformers' own loss (mean NLL over the same tokens) agrees
    with torch.no_grad():
        for i in range(len(cases)):
            kw = {"pixel_values": spix[i:i + 1]} if cases[i][1] else {}
            loss = loaded(input_ids=sids[i:i + 1], attention_mask=smask[i:i + 1], labels=labels[i:i + 1], **kw).loss
            assert abs(loss.item() + sums[i].item() / counts[i].item()) < 1e-5, (loss, sums[i], counts[i])
    with open(os.path.join(ROOT, "score-cases.jsonl"), "w") as f:
        for (prompt, image, response), s, n in zip(cases, sums.tolist(), counts.tolist()):
            f.write(json.dumps({"prompt": prompt, "image": image, "response": response, "logprob": s,
                                "tokens": n}) + "\n")

    refs = {
        "pixel_values": pixel_values,
        "input_ids": input_ids, "attention_mask": mask, "position_ids": pos, "logits": logits,
        "image_features": image_features, "vision_hidden": vision_hidden,
        "greedy_prompt_ids": gp, "greedy_ids": gids,
        "greedy_batch_prompt_ids": bids, "greedy_batch_attention_mask": bmask, "greedy_batch_ids": bnew,
        "score_input_ids": sids, "score_attention_mask": smask, "score_labels": labels,
        "score_sums": sums, "score_counts": counts, "score_token_logprobs": token_logprobs,
    }
    save_safetensors(refs, os.path.join(ROOT, "llava-tiny-ref.safetensors"))
    return refs


# ----------------------------------------------------------------------------------------------------------------
# Llama (text only)
# ----------------------------------------------------------------------------------------------------------------

# original_max_position_embeddings 64 (not 32) puts one of the 8 rotary frequencies (head_dim 16, theta 5e5:
# wavelengths 6.3, 32.4, 167, ...) inside the smoothed band (16 < 32.4 < 64), so all three llama3 branches run:
# kept (6.3 < 16), smoothed (32.4), divided by factor (>= 64).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def make_llama(tok):
    folder = os.path.join(ROOT, "llama-tiny")
    os.makedirs(folder, exist_ok=True)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=256,
                         rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}, tie_word_embeddings=True,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, hidden_act="silu")
    model = LlamaForCausalLM(config).eval()
    # token std 0.25, not 0.5: with tied embeddings a larger scale makes greedy decoding repeat one token forever
    init_weights(model, seed=4321, token_std=0.25)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    new_keys, cfg, gen = saved_keys(model)
    print("llama: save_pretrained writes lm_head.weight?", "lm_head.weight" in new_keys)
    print("llama: save_pretrained config rope keys:",
          {k: cfg[k] for k in ("rope_scaling", "rope_theta", "rope_parameters") if k in cfg})
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(new_keys) == set(state), sorted(set(new_keys) ^ set(state))
    save_safetensors(state, os.path.join(folder, "model.safetensors"))

    # config.json shaped like a real Llama-3.x checkpoint: classic rope_theta + rope_scaling, no rope_parameters
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = dict(LLAMA3_ROPE)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["tie_word_embeddings"] = True
    cfg["torch_dtype"] = "float32"
    dump_json(cfg, os.path.join(folder, "config.json"))
    gen = gen or {}
    gen.update({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    dump_json(gen, os.path.join(folder, "generation_config.json"))
    write_tokenizer(tok, folder)

    loaded = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    print("llama: reloaded rope config:", loaded.config.rope_parameters)
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    head_dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ratio = loaded.model.rotary_emb.inv_freq / plain
    print("llama: llama3 inv_freq / plain inv_freq per frequency:", [round(r, 4) for r in ratio.tolist()])
    assert ratio[0] == 1 and ((ratio > 0.126) & (ratio < 0.99)).any() and (ratio - 1 / 8).abs().min() < 1e-6
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    model.set_attn_implementation("eager")
    return model, loaded


LONG_TEXT = ("The image shows a quiet park with a tall green tree next to a red bench. A small brown dog sits under "
             "the bench, and a white cat watches from behind a blue box. Near the path there are three yellow "
             "flowers, two orange balls and one purple kite. In the market, a silver clock hangs above a door, a pink "
             "umbrella leans on a wall, and a black bicycle is left of the station. How many birds are there? There "
             "are five birds on the window.")


def llama_refs(model, loaded, ids_):
    long_ids = [BOS] + ids_.enc(LONG_TEXT)
    assert len(long_ids) >= 100, len(long_ids)
    rows = [long_ids[:100], [BOS] + ids_.enc("What color is the ball? The ball is red, and the cube is blue.")]
    input_ids, mask, pos = pad_rows(rows, "left")
    with torch.no_grad():
        out = loaded(input_ids=input_ids, attention_mask=mask, position_ids=pos).logits
        assert torch.equal(out, model(input_ids=input_ids, attention_mask=mask, position_ids=pos).logits)
        for i, r in enumerate(rows):
            diff = (loaded(input_ids=torch.tensor([r])).logits[0] - out[i, -len(r):]).abs().max().item()
            print(f"llama: row {i} single vs padded batch max |diff| = {diff:.2e}")
            assert diff < 1e-4
    logits = out * mask[..., None]

    starts = corpus()[::40]  # 22 sentences; the most varied safe continuation wins
    gp, _, gids, margin = pick_greedy(loaded, [[[BOS] + ids_.enc(t)] for t in starts], 32)
    print(f"llama: greedy prompt {gp.tolist()}\n       -> {gids.tolist()} (min margin {margin:.4f})")
    refs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos, "logits": logits,
            "greedy_prompt_ids": gp, "greedy_ids": gids}
    save_safetensors(refs, os.path.join(ROOT, "llama-tiny-ref.safetensors"))
    return refs


# ----------------------------------------------------------------------------------------------------------------

SOURCES = """# tests/fixtures: where these files come from

Everything here is generated by `python3 scripts/make_fixtures.py` (run from the repository root; it deletes and
rewrites these files; fixed seeds, one torch thread, so a re-run with the same versions gives the same bytes).
Made with torch {torch}, transformers {transformers}, tokenizers {tokenizers}, safetensors {safetensors} (CPU, fp32).
Licence: generated data (random weights, a synthetic English corpus), same licence as the project (MIT OR Apache-2.0).
The Rust tests read these files; nothing reads ../shared or runs Python at test time.

| file | what it is |
|---|---|
| `tokenizer/tokenizer.json` | Llama-style BPE trained on ~850 generated sentences about objects/colours/shapes/scenes: 1024 ids. `<unk>`=0, `<s>`=1, `</s>`=2, byte tokens `<0x00>`..`<0xFF>`=3..258 (byte_fallback, e.g. newline = `<0x0A>` = 13), characters and merged pieces 259..1021, then added special tokens `<image>`=1022, `<pad>`=1023. Metaspace pre-tokenizer (`▁`, prepend_scheme "first", split false), Llama-2 decoder (Replace `▁`->space, ByteFallback, Fuse, Strip 1 leading space). No normalizer, no post-processor: it never adds BOS. |
| `tokenizer/tokenizer_config.json`, `special_tokens_map.json` | HF-style companions: bos `<s>`, eos `</s>`, unk `<unk>`, pad `<pad>`, image_token `<image>`, tokenizer_class LlamaTokenizer. |
| `llava-tiny/` | `LlavaForConditionalGeneration` with random weights in the llava-hf layout and the OLD llava-hf tensor names (`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.linear_{{1,2}}.*`), `model.safetensors` metadata `{{"format":"pt"}}`. Llama: hidden 128, MLP 256, 2 layers, 4 heads, 2 KV heads, vocab 1024, rope_theta 1e4, untied lm_head. CLIP: 36 px, patch 8 (floor: 4x4 = 16 patches + CLS), hidden 64, MLP 256, 3 layers, 4 heads, quick_gelu. vision_feature_layer -2, strategy "default" (16 image positions), projector gelu with biases. `config.json`, `generation_config.json`, `preprocessor_config.json` (CLIPImageProcessor: shortest_edge 36, crop 36x36, bicubic, 1/255, CLIP mean/std) and the tokenizer files. |
| `llama-tiny/` | `LlamaForCausalLM`, random weights, standard names `model.*`, tied embeddings (no `lm_head.weight` tensor). hidden 64, MLP 160, 2 layers, 4 heads, 1 KV head, vocab 1024, `rope_theta` 5e5 and `rope_scaling` llama3 (factor 8, low 1, high 4, original_max_position_embeddings 64 so all three frequency bands occur) written as the classic keys, like real Llama-3 checkpoints (no `rope_parameters`). Same tokenizer. |
| `llava-tiny-ref.safetensors` | reference outputs of transformers for llava-tiny (list below). |
| `llama-tiny-ref.safetensors` | reference outputs of transformers for llama-tiny (list below). |
| `score-cases.jsonl` | the three scoring rows as strings: `{{"prompt", "image": "img0"/"img1"/null, "response", "logprob", "tokens"}}`. `img0`/`img1` are `pixel_values[0]`/`[1]` of llava-tiny-ref (already normalised tensors, not image files). |

Weights: matrices N(0, 1/fan_in), token embeddings N(0, 0.5) (llava) / N(0, 0.25) (llama, tied), CLIP position and
class embeddings N(0, 1), every LayerNorm/RMSNorm weight U(0.5, 1.5), every bias N(0, 0.1).

## Prompts and ids

enc(s) = `tokenizer.encode(s, add_special_tokens=False).ids` on tokenizer.json (so each enc() call starts its
text with `▁`). Template (llava-hf, no system text):

- image row: `[1] + enc("USER: ") + [1022]*16 + enc("\\n" + prompt + " ASSISTANT:")`
- text-only row: `[1] + enc("USER: " + prompt + " ASSISTANT:")`
- response (scoring): `enc(response) + [2]`, appended directly after the prompt ids.

Because enc() is called per chunk, a `▁` (id 306) follows the image block, as in LLaVA's own
`tokenizer_image_token`; tokenizing the whole string `"USER: <image>\\n..."` in one call gives no `▁` there.

## llava-tiny-ref.safetensors (fp32 floats, int64 ids)

{llava_table}

- `logits`, `position_ids`, `attention_mask`: left padding with id 1023 and mask 0; position_ids =
  (mask.cumsum(-1) - 1).clamp(min=0), passed explicitly to the forward. Logits at pad positions are set to 0:
  compare only where attention_mask is 1. Rows 0 and 1 use pixel_values[0] and [1]; row 2 has no image.
- `vision_hidden`: CLIP hidden state after encoder layer 2 of 3 (`hidden_states[-2]`, CLS first, before the CLS drop).
- `image_features`: the projector output for the 16 patch positions.
- `greedy_prompt_ids` (image 0) and `greedy_ids`: `generate(do_sample=False, max_new_tokens=32, min_new_tokens=32)`,
  new tokens only. The prompt was chosen so that plain argmax picks every token (EOS is never the argmax, so
  stopping at EOS or not makes no difference), no EOS/`<image>`/`<pad>` is generated, and the top-1/top-2 logit
  gap stays above {margin} at every step.
- `greedy_batch_prompt_ids` + `greedy_batch_attention_mask` (left-padded, row i uses pixel_values[i]) and
  `greedy_batch_ids`: the same with 16 new tokens, batch 2; equal to each row generated alone.
- `score_*`: right-padded (pad 1023, mask 0). `score_labels` is -100 on BOS, prompt, image and pad positions, the
  response ids elsewhere. `score_sums[r]` = sum over labelled t of log_softmax(logits[r, t-1])[labels[r, t]];
  `score_counts[r]` = number of labelled tokens; `score_token_logprobs[r, t]` = that per-token term (0 where
  unlabelled). Rows 0 and 1 use pixel_values[0] and [1]; row 2 is text-only.

## llama-tiny-ref.safetensors

{llama_table}

- Row 0 is 100 tokens (positions 0..99); row 1 is left-padded like above. Logits at pad positions are 0.
- `greedy_prompt_ids` / `greedy_ids`: as for llava, 32 new tokens.
"""


def write_sources(refs, lrefs):
    def table(r):
        rows = ["| tensor | shape | dtype |", "|---|---|---|"]
        rows += [f"| `{k}` | {list(v.shape)} | {str(v.dtype).replace('torch.', '')} |" for k, v in sorted(r.items())]
        return "\n".join(rows)

    import safetensors
    text = SOURCES.format(torch=torch.__version__, transformers=transformers.__version__,
                          tokenizers=tokenizers.__version__, safetensors=safetensors.__version__,
                          llava_table=table(refs), llama_table=table(lrefs), margin=MIN_MARGIN)
    with open(os.path.join(ROOT, "SOURCES.md"), "w") as f:
        f.write(text)


def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
    for sub in ("tokenizer", "llava-tiny", "llama-tiny"):
        shutil.rmtree(os.path.join(ROOT, sub), ignore_errors=True)
    tok = build_tokenizer()
    write_tokenizer(tok, os.path.join(ROOT, "tokenizer"))
    ids_ = Ids(tok)
    print("tokenizer: enc('USER: ') =", ids_.enc("USER: "))
    print("tokenizer: enc('\\nDescribe the image. ASSISTANT:') =", ids_.enc("\nDescribe the image. ASSISTANT:"))

    model, loaded, _ = make_llava(tok)
    refs = llava_refs(model, loaded, ids_)
    lmodel, lloaded = make_llama(tok)
    lrefs = llama_refs(lmodel, lloaded, ids_)

    write_sources(refs, lrefs)
    for name, r in (("llava-tiny-ref", refs), ("llama-tiny-ref", lrefs)):
        print(name)
        for k, v in sorted(r.items()):
            print(f"    {k:28s} {str(list(v.shape)):18s} {v.dtype}")


if __name__ == "__main__":
    main()
