"""The `bard` command line: real subprocesses, exit codes, one-line errors, --json output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BARD = [sys.executable, "-m", "flows.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*BARD, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def call(capsys, *args: str) -> tuple[int, str, str]:
    """`bard ARGS` in this process (what needs no fresh interpreter): exit code, stdout, stderr."""
    from flows.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def in_process(capsys, *args: str) -> tuple[int, str]:
    code, _, err = call(capsys, *args)
    return code, err


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("demo", "synth", "tiny-model", "pretrain-tiny", "curate", "train", "generate", "bench-decode",
                    "eval", "gate", "registry", "ablate", "pipeline", "ui"):
        assert command in out.stdout


def test_bad_arguments_give_one_line_and_exit_2(capsys):
    out = run("synth", "--out", "x", "--size", "3")  # the real process: exit code and streams
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and out.stdout == "", out.stderr
    for args in (("synth",), ("nonsense",), ("tiny-model", "--out", "x", "--set", "hidden_size"),
                 ("tiny-model", "--out", "x", "--set", "nope=1"),
                 ("tiny-model", "--out", "x", "--set", "num_key_value_heads=3")):
        code, stdout, err = call(capsys, *args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and stdout == "", (args, err)


def test_pipeline_and_demo_reject_bad_arguments_before_any_work(tmp_path, capsys):
    for args, message in {
        ("pipeline", "--stage-set", "8=train.lr=1"): "B:KEY=VALUE",
        ("pipeline", "--stage-set", "64:train.lr=1e-4"): "outside the schedule",
        ("pipeline", "--stage-set", "8:train.lr=-1"): "lr",
        ("pipeline", "--block-sizes", "4,x"): "comma-separated block sizes",
        ("pipeline", "--block-sizes", "8,4"): "larger multiple",
        ("pipeline", "--set", "gate.z=-2"): "z",
        ("pipeline", "--source", f"llava_ov={tmp_path / 'nope'}"): "no such file",
        ("pipeline", "--source", f"llava_ov={tmp_path}"): "--include-path",
        ("demo", "--world-size", "3"): "--world-size",
    }.items():
        code, err = in_process(capsys, *args, "--root", str(tmp_path / "runs"))
        assert code == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_synth_and_tiny_model_work_offline(tmp_path, capsys):
    code, out, err = call(capsys, "synth", "--out", str(tmp_path / "w"), "--size", "20", "--bench-size", "4", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["benchmarks"]) == {"shapes_mcq", "shapes_yesno", "shapes_count", "shapes_ocr", "shapes_extract"}
    assert (tmp_path / "w" / "planted.json").exists()
    code, out, err = call(capsys, "tiny-model", "--out", str(tmp_path / "m"), "--set", "hidden_size=64", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["parameters"] > 0 and (tmp_path / "m" / "model.safetensors").exists()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 64


def test_new_commands_reject_bad_arguments_in_one_line(tmp_path, capsys):
    cases = [
        ("curate", "--out", str(tmp_path / "o")),  # no source
        ("curate", "--source", "weird=/x", "--out", str(tmp_path / "o")),
        ("curate", "--source", "llava_ov=/does/not/exist", "--out", str(tmp_path / "o")),
        ("curate", "--source", "llava_ov=/tmp", "--set", "data.nope=1", "--out", str(tmp_path / "o")),
        ("train", "--data", str(tmp_path), "--init", str(tmp_path), "--out", str(tmp_path / "o")),
        ("generate", "--model", str(tmp_path), "--prompt", "hi"),
        ("bench-decode", "--model", str(tmp_path), "--ar-model", str(tmp_path), "--benchmark", "x",
         "--benchmarks-dir", str(tmp_path)),
        ("pretrain-tiny", "--out", str(tmp_path / "b"), "--minutes", "0"),
        ("pretrain-tiny", "--out", str(tmp_path / "b"), "--steps", "0"),
        ("pretrain-tiny", "--out", str(tmp_path / "b"), "--steps", "5", "--eval-every-steps", "-1"),
        ("pretrain-tiny", "--out", str(tmp_path / "b"), "--steps", "5", "--minutes", "1"),
        ("pretrain-tiny", "--out", str(tmp_path / "b"), "--weight", "yesno"),
        ("pretrain-tiny", "--out", str(tmp_path / "b"), "--weight", "nope=2"),
        ("pretrain-tiny", "--out", str(tmp_path / "b"), "--weight", "mcq=-1"),
        ("pretrain-tiny", "--out", str(tmp_path / "b"), *sum((["--weight", f"{f}=0"] for f in
                                                             ("colour", "shape", "count", "yesno", "mcq", "ocr",
                                                              "extract")), [])),
        ("train", "--recipe", "qwen3-vl-4b", "--set", "train.parallel=zero3", "--data", str(tmp_path), "--init",
         str(tmp_path), "--out", str(tmp_path / "o"), "--dry-run"),
    ]
    for args in cases:
        code, stdout, err = call(capsys, *args)
        assert code == 2, (args, stdout, err)
        assert len(err.strip().splitlines()) == 1, (args, err)


def test_eval_and_gate_reject_bad_arguments_in_one_line(tmp_path, tiny_model_dir, capsys):
    import shutil

    model = str(tiny_model_dir)
    untagged = tmp_path / "untagged"  # a stage whose bard.json lacks the token ids it trained with
    shutil.copytree(tiny_model_dir, untagged)
    (untagged / "bard.json").write_text(json.dumps({"block_size": 4, "label_shift": True}))
    for args, message in {
        ("eval", "--model", str(tmp_path), "--out", "o"): "not a model directory",
        ("eval", "--model", model, "--limit", "0", "--out", "o"): "--limit must be positive",
        ("eval", "--model", model, "--include-path", str(tmp_path / "nope"), "--out", "o"): "not a directory",
        ("eval", "--model", model, "--threshold", "high", "--out", "o"): "--threshold",
        ("eval", "--model", model, "--threshold", "0.9,1.5", "--out", "o"): "bard eval: thresholds must lie in [0, 1]",
        ("eval", "--model", model, "--recipe", "huge", "--out", "o"): "unknown recipe",
        ("eval", "--model", model, "--set", "thresh=0.5", "--out", "o"): "not a decode setting",
        ("eval", "--model", model, "--mode", "diffusion", "--out", "o"): "is an AR checkpoint",
        ("eval", "--model", str(untagged), "--out", "o"): "does not record the token ids",
        ("generate", "--model", str(untagged), "--prompt", "hi"): "does not record the token ids",
        ("generate", "--model", model, "--prompt", "hi", "--device", "tpu9"): "--device",
        ("bench-decode", "--model", model, "--ar-model", model, "--benchmark", "shapes_ocr", "--benchmarks-dir",
         str(tmp_path), "--device", "tpu9"): "bard bench-decode: --device",
        ("gate", "--candidate", str(untagged), "--baseline", model, "--out", "o"): "does not record the token ids",
        ("gate", "--candidate", model, "--baseline", model, "--out", "o"): "not a block-diffusion checkpoint",
        ("gate", "--candidate", model, "--baseline", model, "--set", "gate.z=-1", "--out", "o"): "z",
    }.items():
        code, err = in_process(capsys, *args)
        assert code == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
    if not torch.cuda.is_available():  # a GPU asked for where there is none: refused before loading anything
        for args in (("generate", "--model", model, "--prompt", "hi"), ("bench-decode", "--model", model, "--ar-model",
                     model, "--benchmark", "shapes_ocr", "--benchmarks-dir", str(tmp_path))):
            code, err = in_process(capsys, *args, "--device", "cuda")
            assert code == 2 and f"bard {args[0]}: --device: device cuda: no CUDA device on this machine" in err, err


def test_registry_lists_nothing_before_a_promotion(tmp_path):
    out = run("registry", "--root", str(tmp_path), "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == {"root": str(tmp_path.resolve()), "recipes": {}}


def test_train_dry_run_shows_the_parallel_plan_of_each_recipe(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    plans = {}
    for recipe in ("tiny", "qwen3-vl-2b", "qwen3-vl-8b"):
        out = run("train", "--recipe", recipe, "--data", str(tmp_path), "--init", str(tmp_path), "--out",
                  str(tmp_path / "o"), "--block-size", "8", "--dry-run", "--json")
        assert out.returncode == 0, out.stderr
        plans[recipe] = json.loads(out.stdout)
    assert plans["tiny"]["parallel"] == "ddp" and plans["tiny"]["backend"] == "gloo"
    assert plans["tiny"]["dtype"] == "float32"
    assert plans["tiny"]["memory"] is None and "no safetensors" in plans["tiny"]["memory_note"]  # size unknown
    assert plans["tiny"]["anchor"]["uri"] == str(tmp_path.resolve()) and plans["tiny"]["anchor"]["weight"] > 0
    assert plans["qwen3-vl-2b"]["anchor"] is None  # train.anchor_weight 0 (no label shift)
    out = run("train", "--recipe", "qwen3-vl-2b", "--data", str(tmp_path), "--init", str(tmp_path), "--anchor",
              str(tmp_path), "--block-size", "8", "--out", str(tmp_path / "o"), "--dry-run")
    assert out.returncode == 2 and "reads no AR base" in out.stderr, out.stderr
    assert plans["qwen3-vl-2b"]["parallel"] == "ddp" and plans["qwen3-vl-2b"]["master_weights"] == "bfloat16"
    big = plans["qwen3-vl-8b"]
    assert (big["parallel"], big["backend"], big["dtype"], big["master_weights"], big["workers"]) == (
        "fsdp", "nccl", "bfloat16", "float32", 8)
    assert not (tmp_path / "o").exists()  # a dry run trains and writes nothing
    assert plans["qwen3-vl-2b"]["lr"] == {"merge": 2e-5, "vision": pytest.approx(2e-6), "distill": None}
    out = run("train", "--data", str(tmp_path), "--init", str(tmp_path), "--teacher", str(tmp_path), "--out",
              str(tmp_path / "o"), "--block-size", "8", "--set", "train.lr=2e-4", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["lr"] == {"merge": 2e-4, "vision": 0.0,  # tiny: the vision tower is frozen
                                            "distill": pytest.approx(6e-5)}  # follows the merge rate


def test_generate_prints_text_and_decoding_stats(tiny_model_dir, tmp_path, capsys):
    from bard_core.shapes import world

    image = tmp_path / "scene.png"
    world.render(world.random_scene(__import__("random").Random(0))).save(image)
    model = ("--model", str(tiny_model_dir))

    def generate(*args: str) -> dict:
        code, out, err = call(capsys, "generate", *model, *args, "--json")
        assert code == 0, err
        return json.loads(out)

    result = generate("--image", str(image), "--prompt", "What colour is the shape in cell 5?", "--block-size", "4",
                      "--max-new-tokens", "8")
    assert result["decoder"] == "block-diffusion B=4 tau=0.9 fallback=leftmost" and 0 < result["tokens"] <= 8
    assert result["tpf"] == result["tokens"] / result["nfe"]
    confident = generate("--image", str(image), "--prompt", "Hi", "--block-size", "4", "--max-new-tokens", "4",
                         "--fallback", "confident")
    assert confident["decoder"].endswith("fallback=confident") and confident["tokens"] > 0
    unsure = generate("--image", str(image), "--prompt", "Hi", "--block-size", "4", "--max-new-tokens", "4",
                      "--no-sure-eos")
    assert unsure["decoder"].endswith("fallback=leftmost unsure-eos") and unsure["tokens"] > 0
    code, _, err = call(capsys, "generate", *model, "--prompt", "Hi", "--block-size", "4", "--threshold", "1")
    assert code == 2 and "sure_eos" in err
    ar = generate("--image", str(image), "--prompt", "Hi", "--ar", "--max-new-tokens", "5")
    assert ar["decoder"] == "ar" and ar["nfe"] == ar["tokens"]


def test_decode_flags_are_the_decode_settings_and_default_to_the_checkpoints_recipe():
    import dataclasses

    from bard_core.checkpoint import decode_config
    from bard_core.config import DecodeConfig
    from bard_core.recipes import get_recipe

    fields = [f.name for f in dataclasses.fields(DecodeConfig)]
    for command, skipped in (("generate", {"batch_size", "label_shift"}), ("bench-decode", {"label_shift"})):
        shown = run(command, "--help").stdout
        for name in fields:  # a new decode setting is a new flag of both commands
            assert (f"--{name.replace('_', '-')} " in shown or f"--{name.replace('_', '-')}," in shown) != (
                name in skipped), (command, name)
    tiny = get_recipe("tiny").decode
    assert tiny != DecodeConfig()  # the tiny recipe decodes differently from the defaults: a real check
    assert decode_config({"recipe": "tiny", "block_size": 8}) == dataclasses.replace(tiny, block_size=8)
    promoted = decode_config({"recipe": "tiny", "block_size": 8, "decode": {"threshold": 0.7}}, top_p=0.5)
    assert (promoted.threshold, promoted.top_p, promoted.max_new_tokens) == (0.7, 0.5, tiny.max_new_tokens)
    assert decode_config({"recipe": "not-a-recipe"}) == DecodeConfig()


def test_bench_decode_runs_ar_and_each_threshold_side_by_side(tiny_model_dir, world_dir, capsys):
    code, out, err = call(capsys, "bench-decode", "--model", str(tiny_model_dir), "--ar-model", str(tiny_model_dir), "--benchmark",
              "shapes_ocr", "--benchmarks-dir", str(world_dir / "benchmarks"), "--block-size", "4", "--limit", "3",
              "--threshold", "0.5,0.9", "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["items"] == 3 and [r["threshold"] for r in result["rows"]] == [None, 0.5, 0.9]
    assert all(r["tokens"] <= 3 * 6 and r["tpf"] == pytest.approx(r["tokens"] / r["nfe"]) for r in result["rows"])
    assert all(r["block_size"] == 4 for r in result["rows"][1:])


@pytest.mark.slow
def test_curate_command_runs_the_flow(world_dir, tiny_model_dir, tmp_path):
    env_home = tmp_path / "prefect"
    out = subprocess.run([*BARD, "curate", "--source", f"finevision={world_dir / 'sources/finevision'}",
                          "--benchmarks", str(world_dir / "benchmarks"), "--processor", str(tiny_model_dir),
                          "--out", str(tmp_path / "cur"), "--json"], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env={**os.environ, "PREFECT_HOME": str(env_home), "HF_HUB_OFFLINE": "1",
                                           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_AUTH_MODE": "disabled",
                                           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    counts = result["counts"]
    assert counts["rows_in"] == counts["kept"] + counts["rejected"] and counts["rejected"] > 0
    assert (tmp_path / "cur" / "manifest.json").exists()


def test_stage_budget_rejects_bad_settings_before_any_work(tmp_path, capsys):
    # per-stage learning rates and merge:distill steps are checked up front: a typo must not cost the
    # minutes of synthesis and curation that come first
    cases = {("--lr", "1e-3,2e-3"): "one per stage", ("--lr", "fast"): "--lr", ("--lr", "-1e-3"): "lr",
             ("--steps", "600:0,220"): "MERGE:DISTILL", ("--steps", "6:0,1:1,1:1,1:1,1:1"): "block sizes",
             ("--steps", "6:0,1:1", "--lr", "1e-3,1e-3,1e-3"): "one per stage",
             ("--set", "train.vision_lr_scale=-1"): "vision_lr_scale", ("--set", "train.nope=1"): "nope",
             ("--set", "train.lr=1e-3"): "with --lr", ("--ablate", "train.nope=0"): "nope",
             ("--ablate", "train.long_share"): "KEY=VALUE", ("--set", "train.long_share=1.5"): "long_share",
             ("--speed-batch", "0"): "speed-batch", ("--stage-set", "train.base_pull=2"): "B:KEY=VALUE",
             ("--stage-set", "16:train.base_pull"): "B:KEY=VALUE", ("--stage-set", "64:train.base_pull=2"): "64",
             ("--stage-set", "8:train.base_pull=-1"): "base_pull",
             ("--steps", "6:0,1:1", "--stage-set", "16:train.base_pull=2"): "16",
             ("--recipe", "qwen3-vl-4b"): "not on the tiny base", ("--recipe", "tiny-short"): "unknown recipe"}
    from benchmarks.stage_budget import main

    for args, message in cases.items():
        work = tmp_path / "work"
        with pytest.raises(SystemExit) as exit_:
            main(["--work", str(work), *args])
        captured = capsys.readouterr()
        assert exit_.value.code == 2 and message in captured.err, (args, captured.err)
        assert not work.exists() and captured.out == ""


def test_the_benchmarks_chain_is_the_pipeline_flow_with_per_stage_steps_and_open_gates(tmp_path):
    from bard_core.recipes import get_recipe
    from benchmarks.chain import chain_params

    params = chain_params(tmp_path, seed=12, size=40, limit=8, threshold=0.7, steps=[(6, 0), (3, 2)], lrs=[1e-3],
                          overrides={"noise.kind": "mask"})
    assert params.block_sizes == [4, 8] and params.world.seed == 12 and params.world.bench_size == 8
    assert params.stage_overrides == {4: {"train.merge_steps": "6", "train.distill_steps": "0", "train.lr": "0.001"},
                                      8: {"train.merge_steps": "3", "train.distill_steps": "2", "train.lr": "0.001"}}
    recipe = get_recipe("tiny", {**params.overrides, **params.stage_overrides[8]})
    assert recipe.noise.kind == "mask" and recipe.gate.thresholds == (0.7,) and recipe.gate.limit == 8
    assert recipe.gate.min_tpf == {} and recipe.gate.default_tolerance == 1  # every stage is measured
    assert recipe.train.for_stage(8).merge_steps == 3 and recipe.train.for_stage(8).lr == 1e-3
    pulled = chain_params(tmp_path, steps=[(6, 0), (3, 2)], overrides={"train.base_pull": "5"},
                          stage_sets={8: {"train.base_pull": "2"}})
    assert pulled.stage_overrides[8] == {"train.base_pull": "2", "train.merge_steps": "3", "train.distill_steps": "2"}
    assert get_recipe("tiny", {**pulled.overrides, **pulled.stage_overrides[8]}).train.base_pull == 2
    assert get_recipe("tiny", {**pulled.overrides, **pulled.stage_overrides[4]}).train.base_pull == 5
    everything = chain_params(tmp_path)  # the recipe's own schedule, steps and rates
    assert everything.block_sizes == [4, 8, 16, 32] and everything.stage_overrides == {}
    long = chain_params(tmp_path, recipe="tiny-long", steps=[(6, 0)])  # the long profile, its noise kept
    assert long.recipe == "tiny-long" and long.block_sizes == [4]
    recipe = get_recipe("tiny-long", {**long.overrides, **long.stage_overrides[4]})
    assert recipe.noise.kind == "mask" and recipe.train.targets == "data" and recipe.train.for_stage(4).merge_steps == 6
    assert recipe.gate.min_tpf == {} and recipe.gate.default_tolerance == 1 and recipe.gate.drafter
    assert get_recipe("tiny-long").train.for_stage(16).merge_steps == 2000  # the profile's own, without --steps


def test_generate_in_lossless_mode_answers_what_the_verifier_answers(capsys, tiny_model_dir):
    from bard_core.assets import shipped_base

    base = str(shipped_base())
    code, out, err = call(capsys, "generate", "--model", base, "--prompt", "Name a colour.", "--ar", "--json")
    assert code == 0, err
    ar = json.loads(out.strip().splitlines()[-1])
    code, out, err = call(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "Name a colour.",
                          "--block-size", "4", "--mode", "speculative", "--verifier", base, "--json")
    assert code == 0, err
    spec = json.loads(out.strip().splitlines()[-1])
    assert spec["text"] == ar["text"] and spec["decoder"].startswith("speculative B=4")
    assert spec["nfe"] == 2 * len(spec["accepted"])
    code, _, err = call(capsys, "generate", "--model", base, "--prompt", "x", "--verifier", base)
    assert code == 2 and "--verifier is for --mode speculative" in err
