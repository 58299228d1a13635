"""leanlm's distillation divergences vs TRL's GKDTrainer.generalized_jsd_loss on the same logits.

Run in a venv holding TRL (it is not a leanlm dependency):
    python3 -m venv --system-site-packages /work/venvs/trl && /work/venvs/trl/bin/pip install trl==1.16.0
    /work/venvs/trl/bin/python benchmarks/check_trl_jsd.py
Compares the loss value and the gradient w.r.t. the student logits, for beta in {0, 0.1, 0.5, 0.9, 1},
temperatures 1 and 2, with masked (-100) positions, vocabulary 49152 (the default model's), in float64.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import trl  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402

from leanlm.train.losses import DistillLoss, chunked_loss  # noqa: E402


def main():
    g = torch.Generator().manual_seed(0)
    B, T, V, H = 2, 24, 49152, 32
    W_s = torch.randn(V, H, generator=g, dtype=torch.float64)
    hs = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    t_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :7] = -100
    labels[1, 20:] = -100
    keep = labels != -100
    worst = {"loss": 0.0, "grad": 0.0}
    rows = []
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for temp in (1.0, 2.0):
            h1 = hs.clone().requires_grad_(True)
            ref = GKDTrainer.generalized_jsd_loss(h1 @ W_s.T, t_logits, labels=labels, beta=beta, temperature=temp)
            ref.backward()
            h2 = hs.clone().requires_grad_(True)
            flat_t = t_logits[keep]
            ours = chunked_loss(h2[keep], lambda h: h @ W_s.T, lambda a, b: flat_t[a:b], labels[keep],
                                DistillLoss("jsd", temperature=temp, beta=beta, chunk=7))
            ours.backward()
            dl = abs(float(ours.detach()) - float(ref.detach()))
            dg = float((h1.grad - h2.grad).abs().max())
            worst["loss"], worst["grad"] = max(worst["loss"], dl), max(worst["grad"], dg)
            rows.append({"beta": beta, "T": temp, "trl": float(ref), "leanlm": float(ours), "abs_diff": dl,
                         "grad_max_diff": dg})
    for r in rows:
        print(r)
    print(json.dumps({"trl": trl.__version__, "torch": torch.__version__, "vocab": V, "positions": int(keep.sum()),
                      "max_loss_diff": worst["loss"], "max_grad_diff": worst["grad"]}))
    return 0 if worst["loss"] < 1e-9 and worst["grad"] < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
