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


def _train(model, teacher, batches, progress, restore=None, stop_at=None, cfg=CFG, start=None):
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
        run_phases(model, PHASES, cfg, lambda: next(feed), progress, teacher=teacher, restore=restore,
                   on_checkpoint=on_checkpoint, start_weights=start)
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


def test_a_resumed_stage_keeps_pulling_towards_the_stages_start_not_the_resumed_weights(kit, batches):
    # train.base_pull: the resumed run is given the stage's starting weights and ends where the uninterrupted
    # one does; the pull's target is not the weights resumed from (that run would end elsewhere)
    import dataclasses

    _, base, _ = kit
    cfg = dataclasses.replace(CFG, base_pull=60.0)
    teacher = Teacher(copy.deepcopy(base).eval(), 4)
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    straight = copy.deepcopy(base)
    _train(straight, teacher, batches, Progress(), cfg=cfg)
    unpulled = copy.deepcopy(base)
    _train(unpulled, teacher, batches, Progress())
    distance = lambda m: sum((p - start[n]).pow(2).sum().item() for n, p in m.named_parameters()) ** 0.5  # noqa: E731
    assert distance(straight) < 0.9 * distance(unpulled)  # the pull keeps the stage nearer its start

    stopped = _train(copy.deepcopy(base), teacher, batches, Progress(), stop_at=4, cfg=cfg)

    def resume(begin):
        model = copy.deepcopy(base)
        model.load_state_dict(stopped["weights"])

        def restore(phase_name, optimizer):
            if phase_name == stopped["phase"]:
                optimizer.load_state_dict(stopped["optimizer"])

        _train(model, teacher, batches, Progress.resumed(stopped["meta"]), restore=restore, cfg=cfg, start=begin)
        return model

    resumed = resume(start)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    wrong = resume({n: p.detach().clone() for n, p in _loaded(base, stopped["weights"]).named_parameters()})
    assert max((a - b).abs().max().item() for a, b in zip(straight.parameters(), wrong.parameters())) > 1e-5
    with pytest.raises(ValueError, match="starting weights"):
        resume(None)


def _loaded(base, weights):
    model = copy.deepcopy(base)
    model.load_state_dict(weights)
    return model


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
