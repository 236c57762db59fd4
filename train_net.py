#!/usr/bin/env python
"""Train or evaluate Deformable DETR with Detectron2.

Examples (from the repository root)::

    python train_net.py --config-file configs/r50.yaml --num-gpus 8
    python train_net.py --config-file configs/r50.yaml --eval-only MODEL.WEIGHTS model.pth
    # fine-tune COCO weights on a COCO-format dataset of your own, with its own classes
    python train_net.py --config-file configs/r50_box_refine.yaml MODEL.WEIGHTS coco.pth \
        DATASETS.REGISTER_COCO '(("my_train", "train.json", "imgs/"),)' \
        DATASETS.TRAIN '("my_train",)' DATASETS.TEST '()' MODEL.DEFORMABLE_DETR.NUM_CLASSES 3
"""

from detectron2.engine import default_argument_parser, launch

from deformable_detr.checkpoint import AtomicDetectionCheckpointer
from deformable_detr.ema import load_ema_weights
from deformable_detr.engine import Trainer, check_run_config, setup


def main(args):
    cfg = setup(args)
    if args.eval_only:
        check_run_config(cfg, training=False)
        model = Trainer.build_model(cfg)
        extra = AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        if cfg.SOLVER.EMA.ENABLED:
            load_ema_weights(model, extra)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
