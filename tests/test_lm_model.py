"""The lm-eval model ``bard`` through real lm-eval, on real tiny checkpoints."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

SHAPES = ("shapes_mcq", "shapes_yesno", "shapes_count", "shapes_ocr", "shapes_extract")


@pytest.fixture(scope="module")
def base_lm():
    from bard_core.assets import shipped_base
    from tasks.lm_model import BardLM

    return BardLM(str(shipped_base()), mode="ar", recipe="tiny")


def _suite(world_dir, **kw):
    from tasks.evaluate import Suite

    return Suite(SHAPES, (str(world_dir / "benchmarks"),), **kw)


def test_the_shipped_base_scores_through_lm_eval_exactly_what_the_engine_scores_alone(base_lm, world_dir, tmp_path):
    from bard_core import checkpoint
    from bard_core.shapes import suite
    from tasks.evaluate import evaluate

    report = evaluate(base_lm, _suite(world_dir), tmp_path)
    ids = checkpoint.token_ids(base_lm.processor.tokenizer, base_lm.meta)
    for name in SHAPES:
        items = suite.load_items(world_dir / "benchmarks", name)
        direct = suite.run_ar(base_lm.model, base_lm.processor, name, items, suite.prompts_for(items, base_lm.processor),
                              96, 32, ids)
        assert [report.items[name][str(i)] for i in range(len(items))] == direct.per_item, name
    assert min(report.scores.values()) >= 0.75 and sum(report.scores.values()) / 5 >= 0.9  # its trained level
    assert report.metrics["shapes_yesno"]["acc_plus"] <= report.metrics["shapes_yesno"]["acc"]
    rows = [json.loads(line) for line in (tmp_path / "samples" / "shapes_extract.jsonl").read_text().splitlines()]
    assert len(rows) == len(report.items["shapes_extract"])
    assert all(r["decode"]["tokens"] == r["decode"]["nfe"] > 0 for r in rows)  # AR: one token per forward
    assert report.harness["engine_s"] > 0 and report.harness["total_s"] > report.harness["engine_s"]


def test_a_random_tiny_model_scores_near_chance(tiny_model_dir, world_dir, tmp_path):
    from tasks.evaluate import evaluate
    from tasks.lm_model import BardLM

    report = evaluate(BardLM(str(tiny_model_dir), mode="ar"), _suite(world_dir), tmp_path)
    assert max(report.scores.values()) <= 0.5 and sum(report.scores.values()) / 5 <= 0.25


@pytest.mark.slow
def test_a_trained_block_diffusion_checkpoint_decodes_in_blocks_and_reports_its_speed(stage_b4, tiny_model_dir,
                                                                                     world_dir, tmp_path, monkeypatch):
    import lm_eval.evaluator

    from tasks.evaluate import evaluate_checkpoint

    # lm-eval's own sample log may replace images by hashes: the speed runs must not depend on it
    monkeypatch.setattr(lm_eval.evaluator, "LMEVAL_HASHMM", True)

    suite = _suite(world_dir, speed_benchmark="shapes_extract", speed_items=4)
    reports = evaluate_checkpoint(stage_b4.uri, suite, tmp_path, thresholds=(0.9, 0.3), ar_model=tiny_model_dir,
                                  recipe="tiny")  # the tiny recipe decodes 32 at a time
    assert [r.label for r in reports] == ["tau-0.9", "tau-0.3"] and reports[1].decode["threshold"] == 0.3
    for r in reports:
        assert r.mode == "diffusion" and r.decode["block_size"] == 4 and r.decode["label_shift"] is True
        speed = r.speed
        assert speed["benchmark"] == "shapes_extract" and speed["tpf"] == speed["tokens"] / speed["nfe"]
        assert set(speed["batch"]) == {"1", "32"} and speed["batch"]["1"]["items"] == 4
        assert speed["ar"]["1"]["tpf"] == 1.0 and speed["speedup"]["1"] > 0
        assert (Path(r.samples_uri) / "shapes_mcq.jsonl").exists()
    ar_runs = [r.speed["ar"]["1"] for r in reports]  # the AR base measured again beside each setting: same answers
    assert ar_runs[0]["tokens"] == ar_runs[1]["tokens"] and ar_runs[0]["nfe"] == ar_runs[1]["nfe"]
    for r in reports:
        assert r.speed["speedup"]["1"] == pytest.approx(r.speed["batch"]["1"]["tok_s"] / r.speed["ar"]["1"]["tok_s"])
    assert reports[1].speed["tpf"] >= reports[0].speed["tpf"]  # a lower threshold accepts more per forward
    assert json.loads((tmp_path / "tau-0.3" / "eval.json").read_text())["scores"] == reports[1].scores


def test_speed_is_measured_side_by_side_part_by_part(base_lm, world_dir, tmp_path):
    """Two decoders' tokens/s are compared under the same load: each speed list is cut into parts of whole
    batches, and every decoder decodes a part before the next part starts, the order rotating."""
    from bard_core.assets import shipped_base
    from tasks.evaluate import Suite, evaluate, measure_speed
    from tasks.lm_model import BardLM

    evaluate(base_lm, Suite(("shapes_extract",), (str(world_dir / "benchmarks"),), limit=6), tmp_path)
    requests = list(base_lm.requests.values())
    assert len(requests) == 6
    calls = []

    class Logged(BardLM):
        def decode_contexts(self, args, batch_size):
            calls.append((self.tag, len(args), batch_size))
            return super().decode_contexts(args, batch_size)

    lms = {}
    for tag in ("a", "b"):
        lms[tag] = Logged(str(shipped_base()), mode="ar", recipe="tiny")
        lms[tag].tag = tag
    out = measure_speed(lms, requests, items=4, batch_size=2, rounds=2, answers=("b",))
    assert calls[:2] == [("a", 1, 1), ("b", 1, 1)]  # untimed warm-up
    # batch 1: 4 items in 2 parts; batch 2: 6 items (3 batches) in parts of 2 batches and 1
    assert calls[2:] == [("a", 2, 1), ("b", 2, 1), ("b", 2, 1), ("a", 2, 1),
                         ("a", 4, 2), ("b", 4, 2), ("b", 2, 2), ("a", 2, 2)]
    for size, items in (("1", 4), ("2", 6)):
        a, b = out["a"][size], out["b"][size]  # one model twice: the same tokens and forwards
        assert a["items"] == b["items"] == items and a["tokens"] == b["tokens"] > 0 and a["nfe"] == b["nfe"]
        assert a["tok_s"] == pytest.approx(a["tokens"] / a["seconds"], rel=1e-3)  # seconds rounded to 0.1 ms
    assert "answers" not in out["a"]["1"] and len(out["b"]["1"]["answers"]) == 4


def test_speed_pairing_benchmark_measures_both_ways_every_repeat(world_dir):
    """benchmarks/speed_pairing.py on a 'stage' that is the shipped base in its speculative mode: a row per
    repeat with both methods' speed-ups at batch 1 and N, their summaries, and one JSON line."""
    import subprocess
    import sys

    from bard_core.assets import shipped_base

    out = subprocess.run([sys.executable, "-m", "benchmarks.speed_pairing", "--model", str(shipped_base()),
                          "--benchmarks-dir", str(world_dir / "benchmarks"), "--items", "2", "--batch-size", "2",
                          "--repeats", "2", "--max-new-tokens", "16", "--block-size", "4"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["rows"]) == 2 and result["tpf"] >= 1.0  # speculative: never fewer tokens than forwards
    for row in result["rows"]:
        assert set(row["sequential"]) == set(row["interleaved"]) == {"1", "2"}
        assert all(v > 0 for m in ("sequential", "interleaved") for v in row[m].values())
    summary = result["summary"]
    assert set(summary) == {"sequential_b1", "sequential_b2", "interleaved_b1", "interleaved_b2"}
    for name, s in summary.items():
        method, size = name.split("_b")
        values = [row[method][size] for row in result["rows"]]
        assert s["min"] == min(values) and s["max"] == max(values) and s["mean"] == pytest.approx(sum(values) / 2)
    bad = subprocess.run([sys.executable, "-m", "benchmarks.speed_pairing", "--model", str(shipped_base()),
                          "--benchmarks-dir", str(world_dir / "benchmarks"), "--repeats", "0"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert bad.returncode == 2 and "at least 1" in bad.stderr


def test_speculative_mode_through_lm_eval_scores_exactly_what_its_verifier_scores(base_lm, tiny_model_dir, world_dir,
                                                                                   tmp_path):
    """mode=speculative: a drafter that knows nothing (the random tiny model), the AR base as verifier: every
    benchmark item gets the AR base's answer, so every score is the AR base's; the report says how it decoded."""
    from bard_core.assets import shipped_base
    from tasks.evaluate import evaluate
    from tasks.lm_model import BardLM

    lossless = BardLM(str(tiny_model_dir), mode="speculative", verifier=str(shipped_base()), block_size=4)
    report = evaluate(lossless, _suite(world_dir), tmp_path / "spec")
    ar = evaluate(base_lm, _suite(world_dir), tmp_path / "ar")
    assert report.items == ar.items and report.scores == ar.scores
    assert report.decode["engine"] == "speculative" and report.decode["verifier"] == str(shipped_base())
    rows = [json.loads(line) for line in (tmp_path / "spec" / "samples" / "shapes_extract.jsonl").read_text().splitlines()]
    assert all(r["decode"]["nfe"] == 2 * len(r["decode"]["accepted"]) for r in rows)
    with pytest.raises(ValueError, match="verifier= is for mode=speculative"):
        BardLM(str(tiny_model_dir), mode="diffusion", verifier=str(shipped_base()), block_size=4)


def test_generation_honours_until_and_max_gen_toks(base_lm, world_dir):
    from bard_core.shapes import suite

    item = suite.load_items(world_dir / "benchmarks", "shapes_extract", 1)[0]
    image = Image.open(io.BytesIO(item["image"]["bytes"]))
    context = "<image>" + item["question"]
    (full, first_line, capped, no_until), stats = base_lm.decode_contexts([
        (context, {"until": ["<|im_end|>"], "max_gen_toks": 96}, {"visual": [image]}),
        (context, {"until": ["\n"], "max_gen_toks": 96}, {"visual": [image]}),
        (context, {"until": [], "max_gen_toks": 3}, {"visual": [image]}),
        (context, {"max_gen_toks": 96}, {"visual": [image]})], batch_size=4)
    assert "\n" in full and first_line == full.split("\n")[0] and no_until == full
    assert stats[2]["tokens"] == 3 and full.startswith(capped)
    with pytest.raises(ValueError, match="num_beams"):
        base_lm.decode_contexts([(context, {"num_beams": 4}, {"visual": [image]})], 1)


@pytest.mark.slow
def test_model_args_from_the_command_line_become_decode_settings(stage_b4):
    from lm_eval.api.registry import get_model

    lm = get_model("bard").create_from_arg_string(f"pretrained={stage_b4.uri},threshold=0.7,batch_size=4,"
                                                  "fallback=confident,sure_eos=false")
    assert (lm.mode, lm.decode.threshold, lm.decode.batch_size, lm.decode.fallback) == ("diffusion", 0.7, 4, "confident")
    assert lm.decode.sure_eos is False and lm.decode.block_size == 4 and lm.decode.label_shift is True
    with pytest.raises(ValueError, match="unknown model argument 'thresh'"):
        get_model("bard").create_from_arg_string(f"pretrained={stage_b4.uri},thresh=0.7")


def test_ar_checkpoints_need_mode_ar_or_an_explicit_block_size(tiny_model_dir):
    from tasks.lm_model import BardLM

    with pytest.raises(ValueError, match="mode=ar"):
        BardLM(str(tiny_model_dir))
    assert BardLM(str(tiny_model_dir), block_size=4).decode.block_size == 4


def test_loglikelihood_is_exact_in_ar_mode_and_refused_in_diffusion_mode(base_lm, world_dir):
    import torch
    from lm_eval.api.instance import Instance

    from bard_core.decode import ar_generate_cached
    from bard_core.shapes import suite

    item = suite.load_items(world_dir / "benchmarks", "shapes_count", 1)[0]
    prompt = suite.prompts_for([item], base_lm.processor)[0]
    (g,) = ar_generate_cached(base_lm.model, [prompt], 8, base_lm.ids)
    greedy = g.token_ids[:-1]  # without <|im_end|>
    text = base_lm.processor.tokenizer.decode(greedy)
    assert base_lm.processor.tokenizer(text, add_special_tokens=False)["input_ids"] == greedy
    with torch.no_grad():  # the reference: transformers' own generate, scores step by step
        out = base_lm.model.generate(input_ids=prompt.prompt_ids[None], pixel_values=prompt.pixel_values,
                                     image_grid_thw=prompt.image_grid_thw, mm_token_type_ids=prompt.prompt_mm_types[None],
                                     max_new_tokens=len(greedy), do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
    reference = sum(float(s[0].float().log_softmax(-1)[t]) for s, t in zip(out.scores, greedy))
    visual = {"visual": [Image.open(io.BytesIO(item["image"]["bytes"]))]}
    requests = [Instance("loglikelihood", {}, ("<image>" + item["question"], text, visual), 0),
                Instance("loglikelihood", {}, ("<image>" + item["question"], text + "9", visual), 1)]
    (logp, is_greedy), (worse, not_greedy) = base_lm.loglikelihood(requests)
    assert is_greedy and logp == pytest.approx(reference, abs=1e-3)
    assert not not_greedy and worse < logp
    rolling = base_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("A1: red circle",), 0)])
    assert rolling[0] < 0
    diffusion = base_lm.variant(mode="diffusion", block_size=4)
    with pytest.raises(ValueError, match="generate_until requests only"):
        diffusion.loglikelihood(requests)


def test_a_context_places_its_images_where_its_placeholders_stand():
    from bard_core.inputs import context_messages

    (turn,) = context_messages("Compare <image> with <image>: same?", 2)
    assert [p["type"] for p in turn["content"]] == ["text", "image", "text", "image", "text"]
    assert turn["content"][0]["text"] == "Compare "
    (turn,) = context_messages("<image>How many?", 1)
    assert [p["type"] for p in turn["content"]] == ["image", "text"]
    (turn,) = context_messages("How many?", 2)  # no placeholder: the images first
    assert [p["type"] for p in turn["content"]] == ["image", "image", "text"]
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        context_messages("<image> and <image>", 1)


def test_token_ids_come_from_the_checkpoint_or_the_recipe_never_the_tokenizer_alone(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from bard_core import checkpoint
    from bard_core.recipes import get_recipe

    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "a": 2, "[UNK]": 3}
    hub_like = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                       unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="no <\\|mask\\|> token"):
        checkpoint.token_ids(hub_like)
    qwen = get_recipe("qwen3-vl-2b").model.mask_token_id
    assert checkpoint.token_ids(hub_like, mask_id=qwen).mask == 151671  # an unused embedding row, past the vocab
    recorded = {"token_ids": {"mask": 9, "eos": 1, "pad": 0}}
    assert checkpoint.token_ids(hub_like, recorded, mask_id=qwen).mask == 9  # what the stage trained with wins
    assert checkpoint.token_ids(hub_like, require_mask=False).mask is None  # AR decoding needs none
    stage = {"block_size": 8, "label_shift": True}  # a trained stage that did not record its ids
    with pytest.raises(ValueError, match="does not record the token ids it trained with"):
        checkpoint.token_ids(hub_like, stage, mask_id=qwen)
    assert checkpoint.token_ids(hub_like, stage, require_mask=False).eos == 1  # it still decodes as AR


@pytest.mark.slow
def test_a_trained_stage_records_its_token_ids(stage_b4):
    from bard_core import checkpoint

    meta = json.loads((Path(stage_b4.uri) / "bard.json").read_text())
    _, processor, _ = checkpoint.load(stage_b4.uri)
    tok = processor.tokenizer
    assert meta["token_ids"] == {"mask": tok.convert_tokens_to_ids("<|mask|>"), "eos": tok.convert_tokens_to_ids(
        "<|im_end|>"), "pad": tok.pad_token_id}


def test_the_recipes_attention_implementation_reaches_the_model(tiny_model_dir):
    from bard_core import checkpoint
    from tasks.lm_model import BardLM

    assert checkpoint.load(tiny_model_dir)[0].config._attn_implementation == "sdpa"
    assert checkpoint.load(tiny_model_dir, "eager")[0].config._attn_implementation == "eager"
    assert BardLM(str(tiny_model_dir), mode="ar", recipe="tiny").model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation"):  # transformers' Qwen3-VL refuses flex attention
        BardLM(str(tiny_model_dir), mode="ar", recipe="tiny", recipe_overrides={"model.attn_implementation":
                                                                                "flex_attention"})
