"""Tests of the training engine: optimizer groups, full-model clipping, setup, and train_net.py run
with two gloo workers on the CPU on a tiny dataset."""

import importlib.util
import json
import logging
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, launch
from helpers import (
    BASE_CONFIG,
    TINY_DATASET,
    TRAIN_NET,
    register_coco_dataset,
    tiny_cfg,
    write_cfg,
    write_coco_dataset,
)
from torch import nn

from deformable_detr.config import ConfigError, add_deformable_detr_config
from deformable_detr.engine import (
    Trainer,
    apply_batch_size_policy,
    build_optimizer,
    lr_factor_of,
    maybe_add_full_model_gradient_clipping,
    setup,
)


def _load_train_net():
    spec = importlib.util.spec_from_file_location("deformable_detr_train_net", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Toy(nn.Module):
    """Parameter names like the meta-architecture's, in a few tiny layers."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.backbone.input_proj = nn.Sequential(nn.Conv2d(4, 32, 1), nn.GroupNorm(32, 32))
        self.transformer = nn.Module()
        self.transformer.reference_points = nn.Linear(4, 2)
        self.transformer.sampling_offsets = nn.Linear(4, 8)
        self.transformer.value_proj = nn.Linear(4, 4)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _solver_cfg(**solver):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.WEIGHT_DECAY_NORM = 1e-4
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def test_lr_factor_of():
    names = ["sampling_offsets", "reference_points"]
    assert lr_factor_of("backbone.body.res3.0.conv1.weight", 0.1, 0.5, names) == 0.1
    assert lr_factor_of("backbone.input_proj.0.0.weight", 0.1, 0.5, names) == 1.0
    assert lr_factor_of("transformer.reference_points.weight", 0.1, 0.5, names) == 0.5
    name = "transformer.encoder.layers.0.self_attn.sampling_offsets.bias"
    assert lr_factor_of(name, 0.1, 0.5, names) == 0.5
    assert (
        lr_factor_of("transformer.encoder.layers.0.self_attn.value_proj.bias", 0.1, 0.5, names) == 1
    )
    assert lr_factor_of("class_embed.0.weight", 0.1, 0.5, names) == 1.0


def test_optimizer_groups():
    model = _Toy()
    cfg = _solver_cfg(BACKBONE_MULTIPLIER=0.1, LINEAR_PROJ_MULTIPLIER=0.5)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    lr_of, wd_of = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[p], wd_of[p] = group["lr"], group["weight_decay"]
    named = dict(model.named_parameters())
    expected = {
        "backbone.body.0.weight": 1e-4,
        "backbone.body.1.weight": 1e-4,
        "backbone.input_proj.0.weight": 1e-3,
        "backbone.input_proj.1.bias": 1e-3,
        "transformer.reference_points.weight": 5e-4,
        "transformer.sampling_offsets.bias": 5e-4,
        "transformer.value_proj.weight": 1e-3,
    }
    for name, lr in expected.items():
        assert lr_of[named[name]] == pytest.approx(lr), name
    # Every trainable parameter exactly once, all with weight decay; frozen ones left out.
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(lr_of) == len(trainable)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    assert named["frozen.weight"] not in lr_of
    assert all(wd == pytest.approx(1e-4) for wd in wd_of.values())

    # A CPU model gets AdamW's fused kernel (no grad scaler on a CPU to hand it scaled gradients).
    assert optimizer.defaults["fused"] is True

    assert isinstance(build_optimizer(_solver_cfg(OPTIMIZER="SGD"), model), torch.optim.SGD)
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(_solver_cfg(OPTIMIZER="LAMB"), model)


def test_optimizer_without_fused_cpu_kernel_falls_back(monkeypatch):
    # A PyTorch without AdamW's fused CPU kernel refuses fused=True in the constructor; the
    # optimizer is then built without it, with the same groups.
    real_init = torch.optim.AdamW.__init__

    def init_refusing_fused(self, params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be ... on CUDA")
        real_init(self, params, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", init_refusing_fused)
    model = _Toy()
    optimizer = build_optimizer(_solver_cfg(), model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert not optimizer.defaults["fused"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


def test_full_model_clipping():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    cfg = _solver_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    optimizer_type = maybe_add_full_model_gradient_clipping(cfg, torch.optim.SGD)
    assert issubclass(optimizer_type, torch.optim.SGD)
    optimizer = optimizer_type([{"params": [a]}, {"params": [b]}], lr=1.0)
    grad_a, grad_b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([[12.0, 0.0], [0.0, 0.0]])
    a.grad, b.grad = grad_a.clone(), grad_b.clone()
    optimizer.step()
    # The norm over both parameters together (13) is scaled to 0.5; per-parameter clipping would
    # give each parameter norm 0.5 instead.
    scale = 0.5 / 13.0
    assert torch.allclose(-a.detach(), grad_a * scale, atol=1e-6)
    assert torch.allclose(-b.detach(), grad_b * scale, atol=1e-6)

    # Gradients under the limit are left alone.
    a.grad, b.grad = torch.full((3,), 0.01), torch.zeros(2, 2)
    before = a.detach().clone()
    optimizer.step()
    assert torch.allclose(before - a.detach(), torch.full((3,), 0.01))

    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    assert maybe_add_full_model_gradient_clipping(cfg, torch.optim.SGD) is torch.optim.SGD
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    per_param = maybe_add_full_model_gradient_clipping(cfg, torch.optim.SGD)
    assert per_param is not torch.optim.SGD and issubclass(per_param, torch.optim.SGD)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.0
    with pytest.raises(ValueError, match="CLIP_VALUE"):
        maybe_add_full_model_gradient_clipping(cfg, torch.optim.SGD)


def _messages(caplog, level):
    records = caplog.records
    return [r.getMessage() for r in records if r.levelno == level and r.name.startswith("deform")]


def test_batch_size_policy(caplog):
    cfg = _solver_cfg(IMS_PER_BATCH=32, MAX_ITER=1000, STEPS=(800,))
    caplog.set_level(logging.INFO, logger="deformable_detr.engine")
    # The total batch stays 32 whatever the number of workers: nothing to warn about.
    for workers in (1, 8, 16, 32):
        caplog.clear()
        assert apply_batch_size_policy(cfg, workers) is cfg
        per_worker = 32 // workers
        assert _messages(caplog, logging.INFO) == [
            f"Total batch 32 = {workers} worker(s) x {per_worker} image(s); BASE_LR 0.001, "
            "MAX_ITER 1000"
        ]
        assert not _messages(caplog, logging.WARNING)

    # Another total batch: kept as it is (nothing rescaled), with the official advice.
    caplog.clear()
    cfg.SOLVER.IMS_PER_BATCH = 16
    assert apply_batch_size_policy(cfg, 8) is cfg
    (warning,) = _messages(caplog, logging.WARNING)
    assert "SOLVER.IMS_PER_BATCH=16" in warning and "official total batch of 32" in warning
    assert "does not scale linearly" in warning

    # REFERENCE_WORLD_SIZE: Detectron2's linear auto-scaling, logged with what changed.
    caplog.clear()
    cfg.SOLVER.IMS_PER_BATCH = 32
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 16
    scaled = apply_batch_size_policy(cfg, 8)
    assert scaled is not cfg and cfg.SOLVER.IMS_PER_BATCH == 32
    assert (scaled.SOLVER.IMS_PER_BATCH, scaled.SOLVER.MAX_ITER) == (16, 2000)
    assert scaled.SOLVER.STEPS == (1600,) and scaled.SOLVER.BASE_LR == pytest.approx(5e-4)
    warnings = _messages(caplog, logging.WARNING)
    assert any(
        "Auto-scaling applied" in w
        and "IMS_PER_BATCH 32 -> 16" in w
        and "MAX_ITER 1000 -> 2000" in w
        for w in warnings
    )
    assert len(warnings) == 1
    assert "after auto-scaling" in _messages(caplog, logging.INFO)[0]
    # Already on the reference number of workers: unchanged.
    assert apply_batch_size_policy(cfg, 16) is cfg

    cfg.SOLVER.REFERENCE_WORLD_SIZE = 0
    with pytest.raises(ValueError, match="IMS_PER_BATCH"):
        apply_batch_size_policy(cfg, 3)
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 5
    with pytest.raises(ValueError, match="REFERENCE_WORLD_SIZE"):
        apply_batch_size_policy(cfg, 2)


def test_setup_rejects_bad_input(tmp_path):
    parser = default_argument_parser()
    with pytest.raises(ValueError, match="--config-file"):
        setup(parser.parse_args([]))
    with pytest.raises(ConfigError, match="missing.yaml"):
        setup(parser.parse_args(["--config-file", str(tmp_path / "missing.yaml")]))
    args = parser.parse_args(
        ["--config-file", BASE_CONFIG, "MODEL.DEFORMABLE_DETR.NUM_QUERIS", "10"]
    )
    with pytest.raises(ConfigError, match="override MODEL.DEFORMABLE_DETR.NUM_QUERIS"):
        setup(args)


# ------------------------------------------------------------------------------------------------
# Two-process training through train_net.py
# ------------------------------------------------------------------------------------------------

# Two steps of the tiny model on batches of 4 pictures of the tiny dataset; one checkpoint, at
# the end.
TINY_ENGINE_RUN = [
    "DATASETS.TRAIN", '("ddetr_engine_tiny_train",)',
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "TEST.DETECTIONS_PER_IMAGE", "5",
]  # fmt: skip


def _write_tiny_config(path):
    return write_cfg(tiny_cfg(*TINY_ENGINE_RUN), path)


def _write_tiny_dataset(root):
    write_coco_dataset(root, TINY_DATASET)


def _register_tiny_dataset(root):
    for split in TINY_DATASET:
        register_coco_dataset(f"ddetr_engine_tiny_{split}", root, split)


def _params_file(output_dir, rank):
    return os.path.join(output_dir, f"params_rank{rank}.pth")


def _train_worker(args, dataset_root):
    """Runs in each spawned worker: train_net.main with a trainer that records its parameters."""
    from detectron2.utils import comm

    # Two workers share the machine's cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    _register_tiny_dataset(dataset_root)
    train_net = _load_train_net()

    class RecordingTrainer(train_net.Trainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            self._initial = {k: v.detach().clone() for k, v in self._unwrapped().named_parameters()}

        def _unwrapped(self):
            model = self.model
            return model.module if hasattr(model, "module") else model

        def train(self):
            result = super().train()
            final = {k: v.detach().clone() for k, v in self._unwrapped().named_parameters()}
            torch.save(
                {"initial": self._initial, "final": final, "world_size": comm.get_world_size()},
                _params_file(self.cfg.OUTPUT_DIR, comm.get_rank()),
            )
            return result

    train_net.Trainer = RecordingTrainer
    train_net.main(args)


def test_two_process_gloo_training_and_eval(tmp_path):
    dataset_root = str(tmp_path / "data")
    output_dir = str(tmp_path / "out")
    _write_tiny_dataset(dataset_root)
    config_file = tmp_path / "tiny.yaml"
    _write_tiny_config(config_file)

    args = default_argument_parser().parse_args(
        ["--config-file", str(config_file), "--num-gpus", "2", "OUTPUT_DIR", output_dir]
    )
    launch(_train_worker, 2, dist_url="auto", args=(args, dataset_root))

    rank0 = torch.load(_params_file(output_dir, 0))
    rank1 = torch.load(_params_file(output_dir, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["final"].keys() == rank1["final"].keys()
    for name in rank0["final"]:
        assert torch.equal(rank0["final"][name], rank1["final"][name]), name
    changed = [k for k in rank0["final"] if not torch.equal(rank0["final"][k], rank0["initial"][k])]
    # Every group of the model learned something: backbone, projections, transformer, heads.
    for prefix in ("backbone.body.", "backbone.input_proj.", "transformer.", "class_embed."):
        assert any(k.startswith(prefix) for k in changed), prefix
    assert os.path.isfile(os.path.join(output_dir, "model_final.pth"))

    # Evaluation only, single process, from the checkpoint just written.
    _register_tiny_dataset(dataset_root)
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            str(config_file),
            "--eval-only",
            "MODEL.WEIGHTS",
            os.path.join(output_dir, "model_final.pth"),
            "OUTPUT_DIR",
            output_dir,
            "DATASETS.TEST",
            '("ddetr_engine_tiny_val",)',
        ]
    )
    results = _load_train_net().main(args)
    # Detectron2 returns the single test dataset's results without the dataset level.
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_single_gpu_amp_training(tmp_path):
    dataset_root = str(tmp_path / "data")
    output_dir = str(tmp_path / "out")
    _write_tiny_dataset(dataset_root)
    _register_tiny_dataset(dataset_root)
    config_file = tmp_path / "tiny.yaml"
    _write_tiny_config(config_file)
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            str(config_file),
            "MODEL.DEVICE",
            "cuda",
            "SOLVER.AMP.ENABLED",
            "True",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "OUTPUT_DIR",
            output_dir,
        ]
    )
    _load_train_net().main(args)
    assert os.path.isfile(os.path.join(output_dir, "model_final.pth"))


# ------------------------------------------------------------------------------------------------
# What the entry points check before the long work
# ------------------------------------------------------------------------------------------------


def _tiny_args(tmp_path, *opts, eval_only=False):
    dataset_root = str(tmp_path / "data")
    _write_tiny_dataset(dataset_root)
    _register_tiny_dataset(dataset_root)
    config_file = tmp_path / "tiny.yaml"
    _write_tiny_config(config_file)
    argv = ["--config-file", str(config_file)] + (["--eval-only"] if eval_only else [])
    return default_argument_parser().parse_args(
        argv + ["OUTPUT_DIR", str(tmp_path / "out")] + list(opts)
    )


@pytest.mark.parametrize(
    "opts, message",
    [
        (["DATASETS.TEST", '("ddetr_nowhere_val",)'], "DATASETS.TEST names 'ddetr_nowhere_val'"),
        (["DATASETS.TRAIN", "()"], "DATASETS.TRAIN is empty"),
        (["DATASETS.TRAIN", '("ddetr_nowhere",)'], "DATASETS.TRAIN names 'ddetr_nowhere', not reg"),
        (["MODEL.DEVICE", "gpu"], "MODEL.DEVICE 'gpu' is not a device name"),
        (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER must be a positive number"),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD must be a positive number"),
        (["SOLVER.IMS_PER_BATCH", "0"], r"SOLVER.IMS_PER_BATCH \(0\) is the total batch"),
        (["DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS must be >= 0"),
        (["INPUT.MIN_SIZE_TRAIN", "()"], "INPUT.MIN_SIZE_TRAIN must list positive"),
        (["INPUT.MAX_SIZE_TEST", "0"], "INPUT.MAX_SIZE_TEST must be a positive int"),
        (
            ["DATALOADER.CACHE_IMAGES", "True", "DATALOADER.CACHE_DIR", "/nonexistent/cache"],
            "DATALOADER.CACHE_DIR '/nonexistent/cache' is not a folder",
        ),
    ],
    ids=[
        "test_set",
        "no_train_set",
        "train_set",
        "device",
        "max_iter",
        "ckpt_period",
        "batch",
        "workers",
        "min_size",
        "max_size_test",
        "cache_dir",
    ],
)
def test_bad_config_fails_before_the_model_is_built(tmp_path, monkeypatch, opts, message):
    cfg = setup(_tiny_args(tmp_path, *opts))

    def no_model(cfg):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(Trainer, "build_model", classmethod(lambda cls, cfg: no_model(cfg)))
    with pytest.raises(ValueError, match=message):
        Trainer(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_device_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="MODEL.DEVICE is 'cuda' but no CUDA device is usable"):
        Trainer(setup(_tiny_args(tmp_path, "MODEL.DEVICE", "cuda")))
    args = _tiny_args(tmp_path, "MODEL.DEVICE", "cuda", eval_only=True)
    with pytest.raises(ValueError, match="MODEL.DEVICE is 'cuda'"):
        _load_train_net().main(args)


def test_eval_only_checks_the_test_sets(tmp_path):
    train_net = _load_train_net()
    with pytest.raises(ValueError, match="DATASETS.TEST is empty"):
        train_net.main(_tiny_args(tmp_path, eval_only=True))
    args = _tiny_args(tmp_path, "DATASETS.TEST", '("ddetr_nowhere_val",)', eval_only=True)
    with pytest.raises(ValueError, match="DATASETS.TEST names 'ddetr_nowhere_val'"):
        train_net.main(args)


def test_output_dir_that_cannot_hold_files(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match="OUTPUT_DIR '.*a_file' exists and is not a folder"):
        setup(_tiny_args(tmp_path, "OUTPUT_DIR", str(a_file)))
    with pytest.raises(ValueError, match="OUTPUT_DIR '.*a_file/out' cannot be created"):
        setup(_tiny_args(tmp_path, "OUTPUT_DIR", str(a_file / "out")))
    with pytest.raises(ValueError, match="OUTPUT_DIR is empty"):
        setup(_tiny_args(tmp_path, "OUTPUT_DIR", ""))


def test_evaluation_of_a_model_with_more_classes_than_the_dataset(tmp_path, caplog):
    # A COCO config's class count left on a 2-class dataset. The weights favour class 0 (in the
    # dataset) and class 4 (not in it) far above the others: with 20 detections kept of 10
    # queries x 5 classes, every image gets the 10 of each.
    opts = ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "5", "TEST.DETECTIONS_PER_IMAGE", "20"]
    opts += ["DATASETS.TEST", '("ddetr_engine_tiny_val",)']
    model = Trainer.build_model(setup(_tiny_args(tmp_path, *opts)))
    with torch.no_grad():
        for head in model.class_embed:
            head.weight.zero_()
            head.bias.copy_(torch.tensor([10.0, -10.0, -10.0, -10.0, 10.0]))
    weights = str(tmp_path / "five_classes.pth")
    torch.save({"model": model.state_dict()}, weights)

    args = _tiny_args(tmp_path, *opts, "MODEL.WEIGHTS", weights, eval_only=True)
    with caplog.at_level(logging.INFO, logger="deformable_detr.engine"):
        results = _load_train_net().main(args)
    assert set(results["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-a", "AP-b"}
    assert "20 prediction(s) of class ids >= 2, which the dataset" in caplog.text
    with open(os.path.join(str(tmp_path / "out"), "inference", "coco_instances_results.json")) as f:
        reported = [p["category_id"] for p in json.load(f)]
    # Class 0 is the dataset's category id 1.
    assert reported == [1] * 20


def _autocast_probe(model, seen):
    def probe(module, args):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    return model.register_forward_pre_hook(probe)


def test_amp_on_the_cpu_trains_under_bfloat16_autocast(tmp_path):
    from deformable_detr.engine import CPUAutocastTrainer, cpu_supports_bfloat16

    if not cpu_supports_bfloat16():
        pytest.skip("this CPU has no native bfloat16")

    cfg = setup(_tiny_args(tmp_path, "SOLVER.AMP.ENABLED", "True", "SOLVER.IMS_PER_BATCH", "2"))
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, CPUAutocastTrainer)
    model = trainer.model
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    seen = []
    handle = _autocast_probe(model, seen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
        handle.remove()
    assert seen == [(True, torch.bfloat16)] * cfg.SOLVER.MAX_ITER
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # Outside training steps (evaluation, the next run) autocast is off again.
    assert not torch.is_autocast_enabled("cpu")
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))


def test_amp_on_a_cpu_without_bfloat16_is_refused(tmp_path, monkeypatch):
    from deformable_detr import engine

    monkeypatch.setattr(engine, "cpu_supports_bfloat16", lambda: False)
    cfg = setup(_tiny_args(tmp_path, "SOLVER.AMP.ENABLED", "True"))
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED is True on the CPU.*no native bfloat"):
        Trainer(cfg)
