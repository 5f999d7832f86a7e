#!/usr/bin/env python3
"""TRL/peft reference numbers for bpo's DPO trainer (dev-only; the Rust tests read what this writes).

Run from the repository root after `scripts/make_fixtures.py` has written tests/fixtures/llava-tiny:

    pip install torch transformers trl peft datasets
    python3 scripts/make_dpo_fixtures.py

What it does, all in fp32 on the CPU (DPOConfig turns bf16 on by default, even on the CPU: it is turned off here):

1. Builds llava-hf's processor for tests/fixtures/llava-tiny (CLIPImageProcessor from its preprocessor_config.json,
   the llava-1.5-hf chat template) and a 4-pair vision preference set in TRL's conversational layout
   (tests/fixtures/dpo/pairs.jsonl, images under tests/fixtures/images/).
2. Wraps the model with peft LoRA (r 4, alpha 8, dropout 0, q/k/v/o/gate/up/down of the language model only) and
   `modules_to_save=["multi_modal_projector"]`. B matrices and the projector copy are perturbed with a fixed seed
   so that the policy differs from the reference from the start, then saved with `save_pretrained` as
   tests/fixtures/dpo/init-adapter/ (peft's own names and config).
3. Runs TRL's DPOTrainer for exactly one optimizer step (sigmoid loss, beta 0.1, AdamW lr 1e-3, weight decay 0.01,
   constant schedule, no warm-up, max_grad_norm 1.0, one batch of all 4 pairs, dropout disabled).
   TRL's reference for a model that already carries an adapter is a frozen copy of that starting adapter (LoRA
   and projector): the first step's loss is exactly log 2 and its rewards zero.
4. Writes tests/fixtures/dpo/trl-reference.json: TRL's logged metrics of that step (computed before the update,
   grad_norm before clipping); per-pair summed log-probabilities of the policy before and after the step and of the
   base model (adapters disabled, base projector); DPO loss/rewards/accuracy after the step (reference = the
   starting policy, as in TRL) and of the starting policy against the base model; and the token ids TRL's vision
   collator built (chosen rows, then rejected rows).

Conventions of TRL's vision DPO batches (reproduced by `bpo train --prompt-style trl --template llava-hf
--aspect square`): no BOS, no EOS; the prompt "USER: <image>\n{q} ASSISTANT:" is tokenised in one call (so no
"▁" follows the image block); each completion is tokenised alone as " {text} ".
"""

import json
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F
from datasets import Dataset, Image as ImageFeature
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
MODEL = os.path.join(ROOT, "llava-tiny")
IMAGES = os.path.join(ROOT, "images")
OUT = os.path.join(ROOT, "dpo")

# llava-hf/llava-1.5-7b-hf chat_template.json
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

PAIRS = [
    ("chelsea.png", "What animal is in the picture?", "A cat with orange fur.", "A dog sitting on a red chair."),
    ("coffee.png", "What is on the table?", "A cup of coffee on a plate.", "A green bottle and a fork."),
    ("chelsea.png", "Describe the image.", "A cat looks at the camera.", "Two birds fly over the river."),
    ("astronaut.png", "Who is in the photo?", "A person in a white suit.", "A horse near a blue car and a tree."),
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA, LR, WEIGHT_DECAY, MAX_GRAD_NORM = 0.1, 1e-3, 0.01, 1.0

torch.set_num_threads(1)
torch.manual_seed(0)


def trl_row(image, q, chosen, rejected):
    return {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        "images": [image],
    }


def pair_logps(model, batch):
    """Per-row summed completion log-probs (rows: chosen..., rejected...), adapters as currently set."""
    with torch.no_grad():
        kw = {k: v for k, v in batch.items() if k != "completion_mask"}
        logits = model(**kw).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    sums = (lp * mask).sum(1)
    n = sums.shape[0] // 2
    return sums[:n], sums[n:]


def dpo_metrics(pc, pr, rc, rr):
    delta = (pc - rc) - (pr - rr)
    loss = -F.logsigmoid(BETA * delta).mean()
    cr, rj = BETA * (pc - rc), BETA * (pr - rr)
    return {
        "loss": loss.item(),
        "rewards/chosen": cr.mean().item(),
        "rewards/rejected": rj.mean().item(),
        "rewards/margins": (cr - rj).mean().item(),
        "rewards/accuracies": (cr > rj).float().mean().item(),
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "pairs.jsonl"), "w") as f:
        for p in PAIRS:
            f.write(json.dumps(trl_row(*p)) + "\n")

    tok = AutoTokenizer.from_pretrained(MODEL)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(MODEL), tokenizer=tok, chat_template=TEMPLATE,
        patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*language_model.*\.(" + "|".join(TARGETS) + ")",
        modules_to_save=["multi_modal_projector"],
    )
    model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    init_dir = os.path.join(OUT, "init-adapter")
    shutil.rmtree(init_dir, ignore_errors=True)
    model.save_pretrained(init_dir)
    cfg_path = os.path.join(init_dir, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["base_model_name_or_path"] = "llava-tiny"  # not the absolute path of whoever ran this
    json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    readme = os.path.join(init_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    rows = []
    for image, q, c, r in PAIRS:
        row = trl_row(Image.open(os.path.join(IMAGES, image)).convert("RGB"), q, c, r)
        rows.append(row)
    collator = DataCollatorForVisionPreference(proc)
    batch = collator([json.loads(json.dumps({k: v for k, v in r.items() if k != "images"})) | {"images": r["images"]} for r in rows])

    model.eval()
    pc0, pr0 = pair_logps(model, batch)
    with model.disable_adapter():  # LoRA off and the base projector: the base model
        bc, br = pair_logps(model, batch)

    dataset = Dataset.from_list([trl_row(os.path.join(IMAGES, p[0]), *p[1:]) for p in PAIRS])
    dataset = dataset.cast_column("images", [ImageFeature()]) if hasattr(dataset, "cast_column") else dataset
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, bf16=False, fp16=False, use_cpu=True, learning_rate=LR, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, per_device_train_batch_size=4,
            max_steps=1, logging_steps=1, report_to=[], gradient_checkpointing=False, seed=0, beta=BETA,
            loss_type=["sigmoid"], max_length=None, save_strategy="no", dataloader_num_workers=0,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=proc)
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h][0]

    model.eval()
    pc1, pr1 = pair_logps(model, batch)
    # TRL's reference for a model that already carries an adapter is a frozen copy of that starting adapter
    # (LoRA and projector), i.e. the policy before the step: its first loss is exactly log 2.
    assert abs(logged["loss"] - 0.6931471805599453) < 1e-6, logged
    n = len(PAIRS)
    ids = batch["input_ids"] * batch["attention_mask"] + (1 - batch["attention_mask"]) * -1
    ref = {
        "beta": BETA, "lr": LR, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM,
        "lora": {"r": 4, "alpha": 8, "targets": TARGETS},
        "trl_logged": {k: v for k, v in logged.items() if k in ("loss", "grad_norm", "learning_rate") or "/" in k},
        "after": dpo_metrics(pc1, pr1, pc0, pr0),
        "against_base": dpo_metrics(pc0, pr0, bc, br),
        "policy_chosen_before": pc0.tolist(), "policy_rejected_before": pr0.tolist(),
        "base_chosen": bc.tolist(), "base_rejected": br.tolist(),
        "policy_chosen_after": pc1.tolist(), "policy_rejected_after": pr1.tolist(),
        "chosen_ids": [[t for t in row if t >= 0] for row in ids[:n].tolist()],
        "rejected_ids": [[t for t in row if t >= 0] for row in ids[n:].tolist()],
        "completion_lengths": batch["completion_mask"].sum(1).tolist(),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "trl": __import__("trl").__version__, "peft": __import__("peft").__version__},
    }
    with open(os.path.join(OUT, "trl-reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print(json.dumps({k: ref[k] for k in ("trl_logged", "after", "against_base")}, indent=1))


if __name__ == "__main__":
    main()
