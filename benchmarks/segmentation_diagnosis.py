"""Which half of zero-shot segmentation fails: the grouping or the classification? (issue 19's diagnosis)

For a checkpoint and an eval split (use the SELECTION split, `train`, to decide anything), at each input size:
  grouping_oracle_mIoU    mIoU when every group (argmax of the upsampled assignment) takes the majority ground-truth
                          label of its pixels: what perfect classification of these groups would score;
  object_group_top1_acc   share of ground-truth objects whose majority group's best class (group embedding against
                          the "a photo of a {class}." prompts) is the object's class;
  object_group_purity     mean over objects of the share of their majority group's labelled pixels that are the
                          object: how much of what the classifier sees of an object is the object;
  image_top3_recall       share of objects whose class is among the image embedding's top 3;
  groups_used             distinct groups per image.
`--untrained-seed S` also diagnoses the checkpoint's model untrained (same preset and overrides, weights as
`train()` builds them with seed S): whether training moved the grouping at all.

    python benchmarks/segmentation_diagnosis.py CHECKPOINT EVAL_ROOT --split train --images 40 --sizes 64,128
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
import torch
import torch.nn.functional as F


def diagnose(model, dataset, size: int, n_images: int) -> dict[str, float]:
    from ovseg_core.evaluation.evaluate import image_to_tensor
    from ovseg_core.evaluation.metrics import ConfusionMatrix
    from ovseg_core.zero_shot.classifier import build_zero_shot_classifier
    from ovseg_core.zero_shot.templates import SEGMENTATION_TEMPLATES

    with torch.no_grad():
        text = build_zero_shot_classifier(model, dataset.classnames[1:], SEGMENTATION_TEMPLATES)
    scale = model.logit_scale.exp().clamp(max=100).item()
    oracle, recall, group_right, used, purity = ConfusionMatrix(dataset.num_classes), [], [], [], []
    for index in range(min(n_images, len(dataset))):
        sample = dataset[index]
        label = np.asarray(sample.label)
        image = F.interpolate(image_to_tensor(sample.image)[None], size=(size, size), mode="bilinear",
                              align_corners=False)
        with torch.no_grad():
            out = model.encode_image(image)
        assign = F.interpolate(out.assign.float(), size=label.shape, mode="bilinear", align_corners=False)[0]
        group = assign.argmax(0).numpy()
        used.append(len(np.unique(group)))
        oracle_pred = np.zeros_like(label)
        for g in np.unique(group):
            values = label[(group == g) & (label != 255)]
            oracle_pred[group == g] = np.bincount(values, minlength=dataset.num_classes).argmax() if len(values) else 0
        oracle.update(torch.from_numpy(oracle_pred.astype(np.int64)), label)
        group_class = (scale * F.normalize(out.group_emb[0], dim=-1) @ text.T).argmax(-1).numpy() + 1
        top3 = set(((scale * F.normalize(out.image_emb[0], dim=-1) @ text.T).topk(3).indices + 1).tolist())
        for cls in set(np.unique(label).tolist()) - {0, 255}:
            recall.append(cls in top3)
            majority = np.bincount(group[label == cls]).argmax()
            group_right.append(group_class[majority] == cls)
            purity.append(float(np.mean(label[(group == majority) & (label != 255)] == cls)))
    return {"size": size, "grouping_oracle_mIoU": round(float(oracle.compute().miou), 4),
            "object_group_top1_acc": round(float(np.mean(group_right)), 3),
            "object_group_purity": round(float(np.mean(purity)), 3),
            "image_top3_recall": round(float(np.mean(recall)), 3), "groups_used": round(float(np.mean(used)), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("eval_root", help="a VOC-layout eval folder of layout 'sample'")
    p.add_argument("--split", default="train", help="train = the selection split (decide on this one)")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--sizes", default="64,128", help="input sizes, multiples of the patch size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--untrained-seed", type=int, default=None,
                   help="also diagnose the same model untrained, initialised as train() does with this seed")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ovseg_core.evaluation.datasets import load_dataset
    from ovseg_core.models.checkpoint import load_model_from_checkpoint

    models = {"trained": load_model_from_checkpoint(args.checkpoint).eval()}
    if args.untrained_seed is not None:
        models["untrained"] = untrained_like(args.checkpoint, args.untrained_seed).eval()
    dataset = load_dataset("sample", args.eval_root, split=args.split)
    for name, model in models.items():
        for size in (int(s) for s in args.sizes.split(",")):
            print(json.dumps({"model": name, **diagnose(model, dataset, size, args.images)}))
    return 0


def untrained_like(checkpoint: str, seed: int) -> torch.nn.Module:
    """The checkpoint's preset and model overrides, freshly initialised exactly as train() does with `seed`."""
    from ovseg_core import create_model
    from ovseg_core.models.checkpoint import load_checkpoint

    config = load_checkpoint(checkpoint)["train_config"]
    torch.manual_seed(seed)
    return create_model(config.get("preset", "tiny"), **dict(config.get("model_overrides", ())))


if __name__ == "__main__":
    sys.exit(main())
