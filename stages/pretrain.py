"""pretrain: the fine-tuning regime's pretrained model (docs/parameters.md), the baseline's loop on pool images
that are neither training nor held-out images; `model.init_from: runs/pretrain/model` then
fine-tunes the baseline and every variant from it. With pretrain.enabled false (training from
scratch, the default) it writes only info.json."""
import math

import click

from pipeline.core.config import load_params, resolve_device
from pipeline.core.io import write_json
from stages import params_option, path_option, stage


@click.command()
@params_option
@path_option("--pool", "pool_path", help="prepared image pool (.npz)")
@path_option("--train", "train_path", help="prepared training set (.npz): never pretrained on")
@path_option("--heldout", "heldout_path", help="prepared held-out set (.npz): never pretrained on")
@path_option("--out", help="folder of the pretrained model (model/), its checkpoints and info.json")
@path_option("--resume", "state", help="folder of the resume state, kept while a run is unfinished")
@stage
def main(params_path, pool_path, train_path, heldout_path, out, state):
    p = load_params(params_path)
    cfg = p.pretrain
    if not cfg.enabled:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "info.json", {"pretrained": False})
        return
    # here, not at the top: the default run (no pretraining) should not pay seconds of imports
    import numpy as np

    from pipeline.core.data import ImageSet, unseen_images
    from pipeline.train.launch import train_model
    from pipeline.train.rounds import Plan
    from pipeline.core.seeds import PRETRAIN, derived_seed

    resolve_device(p.train.device)
    images = unseen_images(ImageSet.load(pool_path), [ImageSet.load(train_path), ImageSet.load(heldout_path)],
                           cfg.images, derived_seed(p.seeds.data, PRETRAIN))
    # its own model from scratch, whatever model.init_from says (it names this stage's output), with
    # its own seed: the fine-tuning seeds (seeds.train) all start from this one model
    scratch = p.model_copy(update={"model": p.model.model_copy(update={"init_from": None}),
                                   "seeds": p.seeds.model_copy(update={"train": cfg.seed})})
    plan = Plan(shards=1, rounds=cfg.rounds, steps_per_round=math.ceil(cfg.steps / cfg.rounds))
    train_model("pretrain", scratch, plan, images, np.zeros(len(images), dtype=np.int64), out, state,
                data={"pool": pool_path}, tracked=p)
    write_json(out / "info.json", {"pretrained": True, "images": len(images), "steps": plan.rounds * plan.steps_per_round})


if __name__ == "__main__":
    main()
