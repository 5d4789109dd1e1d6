"""The training loop (bard_core/train_loop.py): phases in order, and a stage resumed from a checkpoint takes exactly
the steps of one that was never stopped."""

from __future__ import annotations

import copy

import pytest
import torch

from bard_core.config import TrainConfig
from bard_core.layout import pack
from bard_core.train import Teacher
from bard_core.train_loop import Phase, Progress, checkpoint_meta, plan, run_phases
from tests.objective_kit import sample

CFG = TrainConfig(lr=3e-3, distill_lr_scale=0.3, vision_lr_scale=1.0, warmup_steps=2, checkpoint_every=2, batch_size=2,
                  merge_steps=4, distill_steps=3)
PHASES = plan("diffusion", CFG, has_teacher=True)


def test_a_stage_has_a_distill_phase_only_with_a_teacher_and_an_ar_base_one_ar_phase():
    assert [p.name for p in PHASES] == ["merge", "distill"]
    assert [p.name for p in plan("diffusion", CFG, has_teacher=False)] == ["merge"]
    assert plan("ar", CFG, has_teacher=True) == [Phase("ar", CFG.base_steps, CFG.lr, CFG.min_lr_ratio)]


@pytest.fixture(scope="module")
def batches(kit):
    processor, model, spec = kit
    generator = torch.Generator().manual_seed(0)
    return [pack([sample(processor, 2 * i), sample(processor, 2 * i + 1)], model, 8, spec, generator=generator)
            for i in range(7)]


def _train(model, teacher, batches, progress, restore=None, stop_at=None):
    """Run the loop from `progress`; with `stop_at`, stop after the checkpoint at that step and return what it
    saved (weights, optimizer state, meta), as a worker killed right after a checkpoint leaves it."""
    saved = {}

    class Stop(Exception):
        """Ends the run right after the checkpoint at `stop_at`."""

    def on_checkpoint(progress, phase, optimizer, metrics, final):
        if progress.step == stop_at:
            saved.update(weights=copy.deepcopy(model.state_dict()), phase=phase.name,
                         optimizer=copy.deepcopy(optimizer.state_dict()),
                         meta=copy.deepcopy(checkpoint_meta({"block_size": 8}, progress, phase, final)))
            raise Stop

    feed = iter(batches[progress.step:])
    try:
        run_phases(model, PHASES, CFG, lambda: next(feed), progress, teacher=teacher, restore=restore,
                   on_checkpoint=on_checkpoint)
    except Stop:
        return saved
    return progress


@pytest.mark.parametrize("stop_at", [2, 6])  # inside merge; inside distill (merge is skipped on resume)
def test_a_resumed_stage_takes_the_same_steps_as_an_uninterrupted_one(kit, batches, stop_at):
    _, base, _ = kit
    teacher = Teacher(copy.deepcopy(base).eval(), 4)
    torch.manual_seed(0)
    straight = copy.deepcopy(base)
    whole = _train(straight, teacher, batches, Progress())
    assert [h["step"] for h in whole.history] == list(range(1, 8))
    assert [h["phase"] for h in whole.history] == ["merge"] * 4 + ["distill"] * 3
    assert all("kd" in h for h in whole.history if h["phase"] == "distill")
    assert not any("kd" in h for h in whole.history if h["phase"] == "merge")  # the teacher serves distill only

    stopped = _train(copy.deepcopy(base), teacher, batches, Progress(), stop_at=stop_at)
    assert stopped["meta"]["step"] == stop_at and stopped["meta"]["final"] is False

    def resume(restore_optimizer: bool):
        model = copy.deepcopy(base)
        model.load_state_dict(stopped["weights"])

        def restore(phase_name, optimizer):
            if restore_optimizer and phase_name == stopped["phase"]:
                optimizer.load_state_dict(stopped["optimizer"])

        return model, _train(model, teacher, batches, Progress.resumed(stopped["meta"]), restore=restore)

    resumed, progress = resume(True)
    assert progress.resumed_from == [stop_at] and [h["step"] for h in progress.history] == list(range(1, 8))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # the comparison can fail: without the optimizer's moments the resumed weights end elsewhere
    fresh, _ = resume(False)
    assert max((a - b).abs().max().item() for a, b in zip(straight.parameters(), fresh.parameters())) > 1e-4


class _Planted:
    """A pickle that runs code when loaded: what a tampered checkpoint's optimizer.pt could hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_resume_state_loads_tensors_and_refuses_a_planted_pickle(tmp_path):
    from bard_core.checkpoint import read_training_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    good = tmp_path / "optimizer.pt"
    torch.save({"phase": "merge", "optimizer": optimizer.state_dict()}, good)
    state = read_training_state(good)
    assert state["phase"] == "merge"
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])  # a real optimizer's state loads under weights_only
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])

    marker = tmp_path / "ran"
    bad = tmp_path / "planted.pt"
    torch.save({"phase": "merge", "optimizer": _Planted(marker)}, bad)
    with pytest.raises(RuntimeError, match="planted.pt: refused"):
        read_training_state(bad)
    assert not marker.exists()  # the payload never ran
