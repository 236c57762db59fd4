"""Class heads of another class count when fine-tuning: exact loading of everything else, fresh rows
equal to the fresh model's, rows transferred by class name (shared, box-refine and two-stage heads),
and the strict paths that keep refusing."""

import pytest
import torch

from deformable_detr.checkpoint import AtomicDetectionCheckpointer
from deformable_detr.checkpoint.finetune import adapt_class_heads, format_fine_tune_table

SHARED = [
    "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE",
    "False",
    "MODEL.DEFORMABLE_DETR.TWO_STAGE",
    "False",
]
REFINE = [
    "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE",
    "True",
    "MODEL.DEFORMABLE_DETR.TWO_STAGE",
    "False",
]
TWO_STAGE = [
    "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE",
    "True",
    "MODEL.DEFORMABLE_DETR.TWO_STAGE",
    "True",
]

FILE_CLASSES = ["circle", "square", "Triangle", "star", "ring", "cross"]
NEW_CLASSES = ["triangle", "hexagon", "circle", "diamond"]
# New row -> file row, by case-insensitive name.
EXPECTED = {0: 2, 2: 0}


def _models(build_ours, perturb, variant):
    source, _ = build_ours("quickstart.yaml", variant + ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "6"])
    perturb(source, seed=1)
    torch.manual_seed(5)
    fresh, _ = build_ours("quickstart.yaml", variant + ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "4"])
    perturb(fresh, seed=2)  # the fresh rows must come from this model, whatever its values
    return source, fresh


@pytest.mark.parametrize("variant", [SHARED, REFINE, TWO_STAGE], ids=["shared", "refine", "2stage"])
@pytest.mark.parametrize("by_name", [True, False], ids=["by_name", "fresh"])
def test_adapt_class_heads(build_ours, perturb, variant, by_name):
    source, fresh = _models(build_ours, perturb, variant)
    file_sd = source.state_dict()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    adapted, report = adapt_class_heads(fresh, file_sd, FILE_CLASSES, NEW_CLASSES, by_name)
    assert report is not None
    fresh.load_state_dict(adapted)  # the strict hook accepts the result
    two_stage = variant is TWO_STAGE
    proposal_head = len(fresh.class_embed) - 1 if two_stage else None
    heads = [k for k in before if k.startswith("class_embed.")]
    assert heads and report["head_keys"] == heads
    for k, v in fresh.state_dict().items():
        if k not in heads:
            assert torch.equal(v, file_sd[k]), k
            continue
        index = int(k.split(".")[1])
        for row in range(4):
            source_row = EXPECTED.get(row) if by_name else None
            if index == proposal_head:
                # Row 0 of the encoder head is the proposal score, never a named class.
                source_row = (0 if by_name else None) if row == 0 else (source_row or None)
            want = before[k][row] if source_row is None else file_sd[k][source_row]
            assert torch.equal(v[row], want), (k, row)
    table = format_fine_tune_table(report, "file.pth")
    assert "6 classes -> 4" in table
    assert ("from checkpoint row 2 ('Triangle')" in table) == by_name
    assert "fresh (focal prior init)" in table


def test_fresh_rows_are_the_focal_prior(build_ours):
    source, _ = build_ours("quickstart.yaml", ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "6"])
    fresh, _ = build_ours("quickstart.yaml", ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3"])
    adapted, _ = adapt_class_heads(fresh, source.state_dict(), None, ["a", "b", "c"])
    expected = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    assert torch.allclose(adapted["class_embed.0.bias"], expected.expand(3))


def test_other_mismatches_are_left_to_the_strict_check(build_ours, tmp_path):
    source, _ = build_ours("quickstart.yaml", ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "6"])
    other, _ = build_ours("quickstart.yaml", ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3"])
    wide, _ = build_ours(
        "quickstart.yaml",
        ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3", "MODEL.DEFORMABLE_DETR.HIDDEN_DIM", "64"],
    )
    assert adapt_class_heads(wide, source.state_dict(), None, None)[1] is None
    path = tmp_path / "file.pth"
    torch.save({"model": source.state_dict()}, path)
    fine_tune = {"class_names": None, "transfer_by_name": True}
    checkpointer = AtomicDetectionCheckpointer(wide, str(tmp_path), fine_tune=fine_tune)
    with pytest.raises(RuntimeError, match="does not match"):
        checkpointer.resume_or_load(str(path), resume=False)
    # A class-count change alone is accepted by the fine-tuning load...
    checkpointer = AtomicDetectionCheckpointer(other, str(tmp_path), fine_tune=fine_tune)
    checkpointer.resume_or_load(str(path), resume=False)
    # ... and refused, naming the key and how to fine-tune, by every strict load.
    with pytest.raises(RuntimeError, match=r"(?s)MODEL\.DEFORMABLE_DETR\.NUM_CLASSES.*fine-tune"):
        AtomicDetectionCheckpointer(other, str(tmp_path)).resume_or_load(str(path), resume=False)


def test_a_resumed_checkpoint_loads_strictly(build_ours, tmp_path):
    source, _ = build_ours("quickstart.yaml", ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "6"])
    other, _ = build_ours("quickstart.yaml", ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3"])
    AtomicDetectionCheckpointer(source, str(tmp_path)).save("model_0000009")
    checkpointer = AtomicDetectionCheckpointer(
        other, str(tmp_path), fine_tune={"class_names": None, "transfer_by_name": True}
    )
    with pytest.raises(RuntimeError, match="NUM_CLASSES"):
        checkpointer.resume_or_load("", resume=True)
