"""The whole line on a hub-shaped checkpoint: its tokenizer has no <|mask|> (like Qwen3-VL's on the hub), the
recipe names the mask id (an unused embedding row), and that id travels in bard.json from the stage that
trained to every reader: curate → bard train B4 → bard train B8 (merge + distil, FSDP2 on 2 gloo workers)
→ bard generate → bard eval → bard gate (promote)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHORT

pytestmark = pytest.mark.slow

GATE = ["--set", "gate.limit=2", "--set", "gate.thresholds=[0.9]", "--set", "gate.speed_items=2",
        "--set", "gate.default_tolerance=1", "--set", 'gate.min_tpf={"8": 0.5}']


def _call(capsys, *args: str) -> dict:
    from flows.cli import main

    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, (args, captured.err[-2000:])
    return json.loads(captured.out.strip().splitlines()[-1])


def test_a_hub_like_model_goes_through_every_command(prefect_server, local_ray, world_dir, tmp_path, capsys):
    from bard_core import checkpoint
    from bard_core.shapes import world
    from bard_core.tiny import save_hub_like_model

    hub, mask_id = save_hub_like_model(tmp_path / "hub")
    _, processor, _ = checkpoint.load(hub)
    assert processor.tokenizer.convert_tokens_to_ids("<|mask|>") in (None, processor.tokenizer.unk_token_id)
    with pytest.raises(ValueError, match="no <\\|mask\\|> token"):  # nothing to guess the mask from
        checkpoint.token_ids(processor.tokenizer)

    sets = [x for k, v in {**SHORT, "model.mask_token_id": str(mask_id), "train.parallel": "fsdp",
                           "train.merge_steps": "8", "train.distill_steps": "4", "train.checkpoint_every": "4"}.items()
            for x in ("--set", f"{k}={v}")]
    curated = _call(capsys, "curate", "--source", f"llava_ov={world_dir / 'sources/llava_ov'}",
                    "--source", f"finevision={world_dir / 'sources/finevision'}", "--processor", str(hub),
                    "--benchmarks", str(world_dir / "benchmarks"), "--out", str(tmp_path / "curated"))
    assert curated["num_rows"] > 0
    b4 = _call(capsys, "train", "--data", curated["uri"], "--init", str(hub), "--block-size", "4",
               "--out", str(tmp_path / "B4"), "--workers", "2", *sets)
    b8 = _call(capsys, "train", "--data", curated["uri"], "--init", b4["uri"], "--teacher", b4["uri"],
               "--block-size", "8", "--out", str(tmp_path / "B8"), "--workers", "2", *sets)
    meta = checkpoint.read_meta(b8["uri"])
    assert meta["parallel"] == "fsdp" and [p["name"] for p in meta["phases"]] == ["merge", "distill"]
    assert meta["token_ids"]["mask"] == mask_id == checkpoint.read_meta(b4["uri"])["token_ids"]["mask"]

    image = tmp_path / "scene.png"
    world.render(world.random_scene(__import__("random").Random(3))).save(image)
    # no recipe given: the mask id comes from the stage's bard.json, not the tokenizer or a recipe
    out = _call(capsys, "generate", "--model", b8["uri"], "--image", str(image), "--prompt", "How many shapes?",
                "--max-new-tokens", "8")
    assert out["decoder"].startswith("block-diffusion B=8") and out["nfe"] >= 1
    scores = _call(capsys, "eval", "--model", b8["uri"], "--tasks", "shapes_count", "--include-path",
                   str(world_dir / "benchmarks"), "--limit", "2", "--out", str(tmp_path / "eval"))
    assert scores["mode"] == "diffusion" and set(scores["scores"]) == {"shapes_count"}
    gate = _call(capsys, "gate", "--candidate", b8["uri"], "--baseline", str(hub), "--include-path",
                 str(world_dir / "benchmarks"), "--registry", str(tmp_path / "registry"), *GATE,
                 "--out", str(tmp_path / "gate"))
    assert gate["stage"] == "B8" and Path(gate["promoted"]["uri"]).is_dir()
    promoted = checkpoint.read_meta(gate["promoted"]["uri"])
    assert promoted["token_ids"]["mask"] == mask_id and promoted["decode"]["threshold"] == 0.9
