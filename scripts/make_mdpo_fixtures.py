#!/usr/bin/env python3
"""mDPO's released loss on fixed log-probabilities, for bpo's `mdpo_loss` (dev-only; the Rust tests read what this
writes, without Python).

    git clone https://github.com/luka-group/mDPO /tmp/mDPO     # the released trainer, not vendored into bpo
    pip install torch trl
    python3 scripts/make_mdpo_fixtures.py --trainer /tmp/mDPO/mdpo_trainer.py

It imports `mDPOTrainer` from the released file and calls its own `get_batch_metrics` (which calls its
`dpo_loss`) on a stub trainer whose `concatenated_forward` returns the fixed log-probs below (policy for the model,
reference for `ref_model`), so the loss, the three reward vectors and every metric come from the released code.
The loss's gradient with respect to the policy's chosen, rejected and image-less (corrupted-image) chosen
log-probs comes from torch's autograd through it. Everything is float64.

The released file was written for an older TRL: `trl.trainer.utils.pad_to_length`, which only its batching code
uses (not called here), is stubbed when the installed TRL lacks it.

Writes tests/fixtures/mdpo/released-loss.json: beta, the six log-prob vectors, the loss, the rewards, the metrics
(the released names) and the gradients.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

# Six pairs: policy = reference (pair 0), then margins of both signs and several sizes; log-probs as summed over
# answers of a few to a few dozen tokens.
POLICY_CHOSEN = [-12.5, -30.25, -7.0, -55.5, -3.125, -18.0]
POLICY_REJECTED = [-14.0, -22.5, -9.75, -60.0, -4.5, -11.0]
POLICY_IMAGELESS = [-13.0, -31.0, -6.5, -70.25, -3.0, -25.5]
REF_CHOSEN = [-12.5, -28.0, -8.5, -54.0, -3.5, -21.0]
REF_REJECTED = [-14.0, -25.0, -9.0, -57.5, -4.25, -10.0]
REF_IMAGELESS = [-13.0, -29.5, -7.25, -66.0, -3.25, -24.0]
BETA = 0.1


def load_trainer(path):
    import trl.trainer.utils as utils

    if not hasattr(utils, "pad_to_length"):
        utils.pad_to_length = lambda *a, **k: None
    spec = importlib.util.spec_from_file_location("mdpo_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mDPOTrainer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", required=True, type=Path, help="mdpo_trainer.py of luka-group/mDPO")
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/mdpo/released-loss.json"))
    args = ap.parse_args()
    trainer_cls = load_trainer(args.trainer)

    t = lambda v, grad=False: torch.tensor(v, dtype=torch.float64, requires_grad=grad)
    policy = [t(POLICY_CHOSEN, True), t(POLICY_REJECTED, True), t(POLICY_IMAGELESS, True)]
    reference = [t(REF_CHOSEN), t(REF_REJECTED), t(REF_IMAGELESS)]

    class Stub:
        beta = BETA
        ref_model = "reference"
        dpo_loss = trainer_cls.dpo_loss

        def concatenated_forward(self, model, batch):
            logps = policy if model == "policy" else reference
            logits = torch.zeros(1, dtype=torch.float64)
            return (*logps, logits, logits, logits)

    stub = Stub()
    loss, metrics = trainer_cls.get_batch_metrics(stub, "policy", {})
    losses, chosen_r, rejected_r, imageless_r = trainer_cls.dpo_loss(stub, *policy, *reference)
    loss.backward()
    out = {
        "source": f"luka-group/mDPO {args.trainer.name}: mDPOTrainer.get_batch_metrics and dpo_loss, float64",
        "beta": BETA,
        "policy_chosen": POLICY_CHOSEN,
        "policy_rejected": POLICY_REJECTED,
        "policy_imageless_chosen": POLICY_IMAGELESS,
        "reference_chosen": REF_CHOSEN,
        "reference_rejected": REF_REJECTED,
        "reference_imageless_chosen": REF_IMAGELESS,
        "loss": loss.item(),
        "losses": losses.tolist(),
        "chosen_rewards": chosen_r.tolist(),
        "rejected_rewards": rejected_r.tolist(),
        "imageless_rewards": imageless_r.tolist(),
        "metrics": {k: float(v) for k, v in metrics.items() if not k.startswith("logits/")},
        "grad_policy_chosen": policy[0].grad.tolist(),
        "grad_policy_rejected": policy[1].grad.tolist(),
        "grad_policy_imageless_chosen": policy[2].grad.tolist(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: loss {out['loss']:.6f}", file=sys.stderr)


if __name__ == "__main__":
    main()
