"""U2PL: entropy split, memory queues (also under DDP), contrastive loss, CutMix, EMA, losses, a fast_dev_run."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hydra.errors import InstantiationException

from semiseg.errors import ConfigError
from semiseg.methods.ema import ramped_ema_decay
from semiseg.methods.memory_bank import ClassQueues
from semiseg.methods.mixing import mix, rolled
from semiseg.methods.u2pl import (
    U2PL,
    ContrastivePixels,
    contrastive_loss,
    cutmix_boxes,
    extreme_share_mask,
    info_nce,
    ohem_cross_entropy,
    pseudo_label_loss,
    select_contrastive_pixels,
)
from semiseg.runner import build_module
from semiseg.train import train

TINY = ("method=u2pl", "method.queue_size=64", "method.background_queue_size=96", "method.num_queries=16")


# ---- entropy split ----------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [0.0, 0.05, 0.2, 0.5, 0.8, 1.0])
def test_entropy_split_drops_exactly_the_requested_share(share: float) -> None:
    generator = torch.Generator().manual_seed(0)
    values = (torch.rand(3, 17, 19, generator=generator) * 4).round() / 4  # many ties
    valid = torch.rand(3, 17, 19, generator=generator) > 0.3
    n_valid = int(valid.sum())
    for largest in (True, False):
        chosen = extreme_share_mask(values, valid, share, largest=largest)
        assert int(chosen.sum()) == round(share * n_valid)
        assert not (chosen & ~valid).any()
        rest = valid & ~chosen
        if chosen.any() and rest.any():
            if largest:
                assert values[chosen].min() >= values[rest].max()
            else:
                assert values[chosen].max() <= values[rest].min()


def test_pseudo_label_loss_paper_and_official_normalisation() -> None:
    logits = torch.zeros(1, 2, 2, 2)  # uniform: CE = log 2 on every pixel
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    keep = torch.tensor([[[True, True], [True, False]]])
    paper = pseudo_label_loss(logits, target, keep, "all_pixels")
    official = pseudo_label_loss(logits, target, keep, "official")
    assert paper.item() == pytest.approx(3 * math.log(2) / 4)
    assert official.item() == pytest.approx(math.log(2) * 4 / 3)


def test_ohem_keeps_only_hard_pixels_unless_too_few() -> None:
    # target probabilities 0.9, 0.6, 0.3, 0.1 on four pixels (two classes)
    p = torch.tensor([0.9, 0.6, 0.3, 0.1])
    logits = torch.stack([p.log(), (1 - p).log()]).view(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    per_pixel = -p.log()
    hard = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1)  # keeps p <= 0.7
    assert hard.item() == pytest.approx(per_pixel[1:].mean().item(), rel=1e-5)
    kept_three = ohem_cross_entropy(logits, target, thresh=0.2, min_kept=3)  # threshold rises to the 3rd smallest
    assert kept_three.item() == pytest.approx(per_pixel[1:].mean().item(), rel=1e-5)
    everything = ohem_cross_entropy(logits, target, thresh=0.2, min_kept=10)
    assert everything.item() == pytest.approx(per_pixel.mean().item(), rel=1e-5)


# ---- memory queues ----------------------------------------------------------------------------------
def _keys(start: int, count: int, dim: int = 4) -> torch.Tensor:
    """Distinct unit vectors identified by their first coordinate's rank."""
    rows = torch.zeros(count, dim)
    rows[:, 0] = torch.arange(start, start + count, dtype=torch.float32) + 1
    rows[:, 1] = 1.0
    return rows


def test_queue_enqueue_dequeue_and_capacity() -> None:
    queues = ClassQueues([5, 3], dim=4, dtype="float32", normalize=False)
    assert queues.size(0) == queues.size(1) == 0
    assert queues.push(0, _keys(0, 2)) == 2
    assert torch.equal(queues.items(0), _keys(0, 2))  # growing: only what was pushed
    assert queues.push(0, torch.zeros(0, 4)) == 0
    queues.push(0, _keys(2, 2))
    queues.push(0, _keys(4, 3))  # 7 pushed into 5 slots: the two oldest are dropped
    assert queues.size(0) == 5
    assert torch.equal(queues.items(0), _keys(2, 5))
    queues.push(0, _keys(7, 1))
    assert torch.equal(queues.items(0), _keys(3, 5))
    queues.push(1, _keys(0, 10))  # one push larger than the queue keeps its newest entries
    assert torch.equal(queues.items(1), _keys(7, 3))
    assert queues.size(0) == 5 and len(queues) == 8
    sample = queues.sample(1, 50)
    assert sample.shape == (50, 4) and all((row == queues.items(1)).all(1).any() for row in sample)
    with pytest.raises(ValueError, match="empty"):
        ClassQueues([2], dim=4).sample(0, 1)


def test_queue_storage_is_normalised_half_precision_and_checkpointed() -> None:
    queues = ClassQueues([8, 8], dim=4)
    queues.push(1, torch.tensor([[3.0, 4.0, 0.0, 0.0]]))
    stored = queues.queue(1)
    assert stored.dtype == torch.float16 and queues.nbytes() == 4 * 2
    assert torch.allclose(stored.float(), torch.tensor([[0.6, 0.8, 0.0, 0.0]]), atol=1e-3)
    state = queues.state_dict()
    assert set(state) == {"queue_0", "queue_1", "pointers"}
    restored = ClassQueues([8, 8], dim=4)
    restored.load_state_dict(state)  # buffers resize to the checkpoint's queues
    assert torch.equal(restored.queue(1), stored) and restored.size(0) == 0
    with pytest.raises(ConfigError, match="queue sizes"):
        ClassQueues([8, 1], dim=4).load_state_dict({**state, "queue_1": torch.zeros(5, 4, dtype=torch.float16)})


def _gather_worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        queues = ClassQueues([10], dim=4, dtype="float32", normalize=False)
        queues.push(0, _keys(100 * rank, rank + 1))  # rank 0 pushes 1 key, rank 1 pushes 2
        queues.push(0, torch.zeros(0, 4))  # an empty push still takes part in the gather
        results[rank] = queues.items(0).clone()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawning two processes takes a while on a busy machine
def test_queues_enqueue_every_ranks_samples_under_ddp(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
        expected = torch.cat([_keys(0, 1), _keys(100, 2)])
        assert torch.equal(results[0], expected) and torch.equal(results[1], expected)


# ---- contrastive loss --------------------------------------------------------------------------------
def test_info_nce_on_a_hand_computed_case() -> None:
    anchors = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positive = torch.tensor([1.0, 0.0])
    negatives = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[0.0, 1.0], [0.0, 3.0]]])
    # anchor 1: cos = (1, 0, -1) / 0.5 -> logits (2, 0, -2); anchor 2: cos = (0, 1, 1) -> (0, 2, 2)
    first = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    second = -math.log(1 / (1 + 2 * math.exp(2)))
    assert info_nce(anchors, positive, negatives, 0.5).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_contrastive_loss_takes_anchors_and_prototype_of_the_true_class() -> None:
    """Class 0 has no anchors; classes 1 and 2 must each meet their own prototype and own negatives (the
    official code would use class 0's and 1's anchors for classes 1 and 2)."""
    dim = 3
    feature = {1: torch.tensor([1.0, 0.0, 0.0]), 2: torch.tensor([0.0, 1.0, 0.0])}
    prototype = {1: torch.tensor([1.0, 1.0, 0.0]), 2: torch.tensor([0.0, 1.0, 1.0])}
    negative = {0: torch.tensor([0.0, 0.0, 1.0]), 1: torch.tensor([1.0, 0.0, 1.0]), 2: torch.tensor([1.0, 1.0, 1.0])}
    student = torch.zeros(1, 1, 4, dim)
    teacher = torch.zeros(1, 1, 4, dim)
    student[0, 0, 0], student[0, 0, 1] = feature[1], feature[2]
    teacher[0, 0, 0], teacher[0, 0, 1] = prototype[1], prototype[2]
    anchors = torch.zeros(3, 1, 1, 4, dtype=torch.bool)
    anchors[1, 0, 0, 0] = anchors[2, 0, 0, 1] = True
    pixels = ContrastivePixels(anchors, anchors.clone(), torch.zeros_like(anchors), anchors.flatten(1).any(1))
    queues = ClassQueues([4, 4, 4], dim=dim, dtype="float32")
    for c in range(3):
        queues.push(c, negative[c].repeat(2, 1))
    student_map = student.permute(0, 3, 1, 2).requires_grad_(True)
    loss, used = contrastive_loss(student_map, teacher.permute(0, 3, 1, 2), pixels, queues, 4, 3, 0.5)
    expected = [info_nce(feature[c].repeat(4, 1), prototype[c], negative[c].repeat(4, 3, 1), 0.5) for c in (1, 2)]
    assert used == 2
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-3)  # float16 queue
    loss.backward()
    assert student_map.grad[0, :, 0, :2].abs().sum() > 0 and student_map.grad[0, :, 0, 2:].abs().sum() == 0


def test_contrastive_pixel_selection_follows_the_paper() -> None:
    # 3 classes, one labeled and one unlabeled image of 1 x 3 pixels
    probs = torch.tensor(
        [
            [[0.6, 0.2, 0.1], [0.3, 0.7, 0.2], [0.1, 0.1, 0.7]],  # labeled: ranks per pixel
            [[0.5, 0.25, 0.2], [0.3, 0.45, 0.3], [0.2, 0.3, 0.5]],
        ]
    ).view(2, 3, 1, 3)
    labels = torch.tensor([[[0, 2, 255]], [[0, 1, 2]]])
    reliable = torch.tensor([[[True, True, False]], [[True, False, False]]])
    unreliable = torch.tensor([[[True, True, False]], [[False, True, True]]])
    is_labeled = torch.tensor([True, False])
    pixels = select_contrastive_pixels(labels, reliable, unreliable, probs, is_labeled, 1, 3, 0.3)
    # anchors: labeled pixel 0 is class 0 with p=0.6; labeled pixel 1 is class 2 with p=0.1 < 0.3 -> no anchor
    assert pixels.anchors[0].tolist() == [[[True, False, False]], [[True, False, False]]]
    assert not pixels.anchors[2].any()
    # labeled negatives of class 1: labeled pixel 1 (label 2) where the teacher ranks class 1 first
    assert pixels.negatives[1][0].tolist() == [[False, True, False]]
    # unlabeled negatives of class 0: unreliable pixels where class 0 ranks in [1, 3): pixels 1 and 2
    assert pixels.negatives[0][1].tolist() == [[False, True, True]]
    # the ignored labeled pixel is nobody's anchor or negative
    assert not pixels.anchors[:, 0, 0, 2].any() and not pixels.negatives[:, 0, 0, 2].any()


def test_rank_window_is_capped_for_binary_datasets() -> None:
    assert U2PL.effective_ranks(3, 20, 2) == (1, 2)
    assert U2PL.effective_ranks(3, 20, 6) == (3, 6)
    assert U2PL.effective_ranks(3, 20, 21) == (3, 20)


# ---- CutMix ---------------------------------------------------------------------------------------
def test_cutmix_boxes_in_bounds_with_labels_mixed_to_match() -> None:
    torch.manual_seed(0)
    batch, height, width = 6, 20, 24
    boxes = cutmix_boxes(batch, height, width, prob=1.0, area=0.5, aspect=(0.5, 2.0))
    assert boxes.shape == (batch, height, width)
    for box in boxes:
        rows, cols = box.any(1).nonzero().squeeze(1), box.any(0).nonzero().squeeze(1)
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        assert box[top : bottom + 1, left : right + 1].all()  # one full rectangle inside the image
        assert int(box.sum()) == pytest.approx(0.5 * height * width, rel=0.15)
    images = torch.randn(batch, 3, height, width)
    labels = torch.randint(0, 5, (batch, height, width))
    mixed_images, mixed_labels = mix(images, rolled(images), boxes), mix(labels, rolled(labels), boxes)
    partner_images, partner_labels = rolled(images), rolled(labels)
    inside = boxes.unsqueeze(1).expand_as(images)
    assert torch.equal(mixed_images[inside], partner_images[inside])
    assert torch.equal(mixed_images[~inside], images[~inside])
    assert torch.equal(mixed_labels[boxes], partner_labels[boxes])
    assert torch.equal(mixed_labels[~boxes], labels[~boxes])
    assert not cutmix_boxes(batch, height, width, prob=0.0).any()


# ---- the module --------------------------------------------------------------------------------------
def _module(make_cfg, *overrides: str) -> U2PL:
    return build_module(make_cfg(*TINY, *overrides))


def _batch(num_classes: int, size: int = 32) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(1)
    labeled = {
        "image": torch.randn(2, 3, size, size, generator=generator),
        "mask": torch.randint(0, num_classes, (2, size, size), generator=generator),
    }
    labeled["mask"][:, :2] = 255
    return labeled, {"image": torch.randn(2, 3, size, size, generator=generator)}


def test_ema_update_follows_the_ramped_decay(make_cfg) -> None:
    module = _module(make_cfg)
    assert [ramped_ema_decay(t, 0.99) for t in (0, 1, 3)] == [0.0, 0.5, 0.75]
    assert ramped_ema_decay(10_000, 0.99) == 0.99
    student = dict(module.net.named_parameters())
    teacher = dict(module.teacher.module.named_parameters())
    with torch.no_grad():
        for parameter in student.values():
            parameter.add_(1.0)
    before = {name: p.clone() for name, p in teacher.items()}
    module._trainer = SimpleNamespace(global_step=4, max_steps=10, max_epochs=-1)  # the 4th step was just taken
    module.on_train_batch_end(None, None, 0)  # decay min(1 - 1/4, 0.99) = 0.75
    for name, parameter in teacher.items():
        assert torch.allclose(parameter, 0.75 * before[name] + 0.25 * student[name], atol=1e-6)
        assert not parameter.requires_grad
    module._trainer = SimpleNamespace(global_step=1, max_steps=10, max_epochs=-1)
    module.on_train_batch_end(None, None, 0)  # first step: the teacher becomes the student
    assert all(torch.equal(teacher[name], student[name]) for name in teacher)


def test_training_losses_log_every_term_and_fill_the_queues(make_cfg) -> None:
    module = _module(make_cfg, "method.anchor_threshold=0.0")  # an untrained teacher is rarely 30% sure
    module.train()
    labeled, unlabeled = _batch(module.num_classes)
    total, terms = module.training_losses(labeled, unlabeled)
    assert {"loss_sup", "loss_unsup", "loss_pseudo", "loss_contrastive", "alpha_t", "ema_decay"} <= set(terms)
    assert all(torch.isfinite(value).all() for value in terms.values())
    assert len(module.memory) > 0
    assert all(module.memory.size(c) <= module.memory.capacities[c] for c in range(module.num_classes))
    total, terms = module.training_losses(labeled, unlabeled)  # the queues now hold negatives
    assert terms["loss_contrastive"] > 0 and terms["contrastive_classes"] >= 1
    total.backward()
    assert all(p.grad is not None for p in module.net.representation.parameters())
    state = module.state_dict()
    assert any(key.startswith("memory.queue_") for key in state)
    fresh = _module(make_cfg)
    fresh.load_state_dict(state)
    assert len(fresh.memory) == len(module.memory)


def test_head_learning_rate_multiplier_makes_two_groups(make_cfg) -> None:
    module = _module(make_cfg, "method.head_lr_multiplier=10", "optimizer=sgd", "optimizer.lr=0.001")
    backbone, heads = module.optimizer_parameter_groups()
    assert "lr" not in backbone and heads["lr"] == pytest.approx(0.01)
    encoder = {id(p) for p in module.net.segmenter.encoder.parameters()}
    assert {id(p) for p in backbone["params"]} == encoder
    everything = {id(p) for p in module.trainable_parameters()}
    assert {id(p) for p in heads["params"]} == everything - encoder


def test_u2pl_rejects_a_network_without_decoder_features(make_cfg) -> None:
    with pytest.raises((ConfigError, InstantiationException), match="smp_deeplabv3plus"):
        _module(make_cfg, "model=unet")
    with pytest.raises((ConfigError, InstantiationException), match="supervised_loss"):
        _module(make_cfg, "method.supervised_loss=dice")


def test_fast_dev_run_with_the_official_variants(make_cfg) -> None:
    results = train(
        make_cfg(
            *TINY,
            "method.supervised_loss=ohem",
            "method.ohem.min_kept=100",
            "method.pseudo_loss_normalization=official",
            "method.prototype_pixels=reliable",
            "method.contrastive_weight=1.0",
            "method.head_lr_multiplier=10",
            "optimizer=sgd",
            "scheduler=poly",
            "trainer.fast_dev_run=true",
        )
    )
    assert results["method"] == "u2pl" and results["steps"] == 1
    assert results["model"] == "smp_deeplabv3plus"


def test_representation_and_logits_shapes(make_cfg) -> None:
    module = _module(make_cfg)
    logits, representation = module.net.forward_with_representation(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, module.num_classes, 32, 32)
    assert representation.shape == (2, 256, 8, 8)
    assert F.softmax(logits, 1).sum(1).allclose(torch.ones(2, 32, 32))


def test_checkpoint_loads_weights_only_with_its_queues(make_cfg, tmp_path: Path) -> None:
    from semiseg.evaluate import load_checkpoint, load_module

    cfg = make_cfg(*TINY, "method.anchor_threshold=0.0")
    train(cfg)
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(path, trust=False)  # torch.load(weights_only=True)
    queues = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("memory.queue_")}
    assert queues and all(v.dtype == torch.float16 for v in queues.values())
    assert sum(v.shape[0] for v in queues.values()) > 0
    module = load_module(path, checkpoint, None)
    assert isinstance(module, U2PL)
    assert all(torch.equal(module.memory.queue(int(k.rsplit("_", 1)[1])), v) for k, v in queues.items())


# ---- fidelity to the official train_semi.py ---------------------------------------------------------
def _encoder_buffers(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in network.segmenter.encoder.named_buffers() if b.is_floating_point()}


def test_warm_up_trains_the_teacher_s_batchnorm_and_validates_the_student(make_cfg) -> None:
    """Official: during sup_only epochs ``model_teacher.train(); _ = model_teacher(image_l)`` and
    ``validate(model)``; afterwards the teacher is copied from the student and validated."""
    import copy

    module = _module(make_cfg, "method.supervised_only_steps=2")
    module.train()
    labeled, unlabeled = _batch(module.num_classes)
    reference = copy.deepcopy(module.teacher.module).train()
    with torch.no_grad():
        reference.forward_with_representation(labeled["image"])  # what the official warm-up step does
    before = _encoder_buffers(module.teacher.module)
    module._trainer = SimpleNamespace(global_step=0, max_steps=10, max_epochs=-1)
    assert module.inference_network is module.net.segmenter  # warm-up: the student is validated
    module.training_losses(labeled, unlabeled)
    after, expected = _encoder_buffers(module.teacher.module), _encoder_buffers(reference)
    assert any(not torch.equal(after[name], before[name]) for name in after)  # the teacher's BN moved...
    assert all(torch.allclose(after[name], expected[name], atol=1e-6) for name in after)  # ...as officially
    state = module.state_dict()
    assert not bool(state["teacher_started"])
    warm = _module(make_cfg, "method.supervised_only_steps=2")
    warm.load_state_dict(state)  # a checkpoint of the warm-up evaluates the student it validated
    assert warm.inference_network is warm.net.segmenter
    old = {k: v for k, v in state.items() if k != "teacher_started"}  # a checkpoint from before the flag
    warm.load_state_dict(old)
    assert warm.inference_network is warm.teacher.module.segmenter
    module._trainer = SimpleNamespace(global_step=2, max_steps=10, max_epochs=-1)  # first semi-supervised step
    module.training_losses(labeled, unlabeled)
    assert module.inference_network is module.teacher.module.segmenter
    student, teacher = dict(module.net.named_parameters()), dict(module.teacher.module.named_parameters())
    assert all(torch.equal(teacher[name], student[name]) for name in teacher)  # copied from the student


def test_teacher_copy_steps_keeps_the_teacher_equal_to_the_student(make_cfg) -> None:
    """Official: in the first semi-supervised epoch ``t_params.data = s_params.data`` every step."""
    module = _module(make_cfg, "method.teacher_copy_steps=3")
    student, teacher = dict(module.net.named_parameters()), dict(module.teacher.module.named_parameters())

    def shift_student() -> None:
        with torch.no_grad():
            for parameter in student.values():
                parameter.add_(1.0)

    for step in (1, 2, 3):  # the steps 0, 1, 2 just taken: still copying
        shift_student()
        module._trainer = SimpleNamespace(global_step=step, max_steps=10, max_epochs=-1)
        module.on_train_batch_end(None, None, 0)
        assert all(torch.equal(teacher[name], student[name]) for name in teacher)
    before = {name: p.clone() for name, p in teacher.items()}
    shift_student()
    module._trainer = SimpleNamespace(global_step=4, max_steps=10, max_epochs=-1)  # step 3: EMA, decay 0.75
    module.on_train_batch_end(None, None, 0)
    assert all(torch.allclose(teacher[n], 0.75 * before[n] + 0.25 * student[n], atol=1e-6) for n in teacher)


def test_present_classes_normalisation_is_the_official_one() -> None:
    """Official: ``reco_loss / valid_seg`` over the classes present, 0 when at most one class is present."""
    dim = 2
    student = torch.zeros(1, dim, 1, 3)
    student[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    teacher = torch.zeros(1, dim, 1, 3)
    teacher[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    anchors = torch.zeros(3, 1, 1, 3, dtype=torch.bool)
    anchors[1, 0, 0, 0] = True  # class 1 has an anchor; class 2 is present but has no anchor; class 0 absent
    present = torch.tensor([False, True, True])
    pixels = ContrastivePixels(anchors, anchors.clone(), torch.zeros_like(anchors), present)
    queues = ClassQueues([4, 4, 4], dim=dim, dtype="float32")
    queues.push(1, torch.tensor([[0.0, 1.0]]))
    args = (pixels, queues, 2, 1, 0.5)
    # anchor (1, 0), positive (1, 0), negative (0, 1): logits (2, 0) -> -log(e^2 / (e^2 + 1))
    one_class = -math.log(math.exp(2) / (math.exp(2) + 1))
    used, _ = contrastive_loss(student, teacher, *args)
    assert used.item() == pytest.approx(one_class, rel=1e-6)  # mean over the one contributing class
    official, _ = contrastive_loss(student, teacher, *args, normalization="present_classes")
    assert official.item() == pytest.approx(one_class / 2, rel=1e-6)  # divided by the 2 present classes
    pixels.present = torch.tensor([False, True, False])
    alone, _ = contrastive_loss(student, teacher, *args, normalization="present_classes")
    assert alone.item() == 0.0  # <= 1 class present: the official code returns 0
