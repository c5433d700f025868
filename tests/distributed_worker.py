"""One process of test_distributed's in-process check: run it plainly (one process) or under
``torchrun --nproc_per_node=2`` (reclip.distributed.setup joins the group from torchrun's
environment, gloo on the CPU).

    python distributed_worker.py OUT DATA BADDATA MODEL_CONFIG

Each process writes OUT/rank<r>.npz: the visual copy's features of DATA (a sharded,
all-gathered pass), the features and skipped paths of BADDATA read with a deferred
skip-bad-images check, the pseudo labels of one epoch of fit on DATA (label propagation: its
k-NN search split over the ranks, rank 0 solving), the prediction pseudo labels of the features
(rank 0's, broadcast) and the trained norm parameters after it; then one epoch of SHOT (the
whole visual tower) and its parameters before and after.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from reclip import distributed
from reclip.adapt import Config, ReCLIP
from reclip.data import image_set
from reclip.models import load_model
from reclip.pseudo_labels import pseudo_labels

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def main(out: str, data_dir: str, bad_dir: str, model: str) -> None:
    distributed.setup("cpu")
    world = distributed.current()
    torch.manual_seed(4)
    loaded = load_model(model)
    # encode batches smaller than a shard (a shard is several batches) and than the class
    # list (ReCLIP-T's step backpropagates its prompts in chunks, under DDP's no_sync); a
    # global batch of 50 leaves a last batch of one item of 151: one rank's part is empty
    config = Config(device="cpu", workers=0, max_epochs=1, seed=2, encode_batch_size=4,
                    batch_size=50)
    clf = ReCLIP(loaded, CLASSES, config=config)
    data = image_set(data_dir, loaded.preprocess)
    feats = clf.encode_images(data, side="visual")
    bad = image_set(bad_dir, loaded.preprocess).check_in_first_pass(skip_bad=True)
    bad_feats = clf.encode_images(bad, side="visual")
    predicted = pseudo_labels(feats, clf.nodes_v, clf.basis_v, method="prediction", world=world)
    clf.fit(data)
    # SHOT: the whole visual tower under DDP, the batch-mean prediction exchanged every step
    shot = ReCLIP(loaded, CLASSES, config=dataclasses.replace(config, method="shot", lr=1e-3))
    shot.fit(data)
    before = dict(loaded.model.named_parameters())
    Path(out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(out) / f"rank{world.rank}.npz", world=world.size, feats=feats.numpy(),
             bad_feats=bad_feats.numpy(), skipped=np.array(bad.skipped), kept=len(bad),
             pseudo_text=clf.last_pseudo["text"], pseudo_visual=clf.last_pseudo["visual"],
             predicted=predicted,
             **{f"param.{k}": v.detach().numpy() for k, v in
                [*clf.text_params.items(), *clf.visual_params.items()]},
             **{f"shot.{k}": v.detach().numpy() for k, v in shot.visual_params.items()},
             **{f"shot_before.{k}": before[k].detach().numpy() for k in shot.visual_params})
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
