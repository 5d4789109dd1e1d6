"""The lossless mode's benchmark scripts: `benchmarks/speculative_fuse.py` (settings side by side) and
`benchmarks/draft_tree.py` (tree drafts, simulated against the engine)."""

from __future__ import annotations

import pytest
import torch


def test_speculative_fuse_benchmark_runs_every_setting_side_by_side():
    """`benchmarks/speculative_fuse.py` on the shipped base, batch 2: a row per (block, draft, look-ahead) setting
    and AR, each answering the AR answers, never under one token per forward; a bad setting is refused."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from bard_core.assets import shipped_base

    def bench(*extra):
        return subprocess.run([sys.executable, "-m", "benchmarks.speculative_fuse", "--checkpoint", str(shipped_base()),
                               "--items", "3", "--repeats", "1", "--max-new-tokens", "16", *extra],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)

    out = bench("--blocks", "16", "--drafts", "block,adaptive", "--rules", "off,after_full", "--batch", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["batch"] == 2 and set(result["rows"]) == {
        "ar", "B16 block off", "B16 block after_full", "B16 adaptive off", "B16 adaptive after_full"}
    for name, row in result["rows"].items():
        assert row["same_as_ar"] == 1.0 and row["tpf"] >= 1.0 and row["tok_s"] > 0, name
    assert "B16 adaptive after_full" in out.stdout  # the table
    bad = bench("--drafts", "narrow")
    assert bad.returncode == 2 and "narrow" in bad.stderr
    # the two-model path (the base drafting for a copy of itself): the verifier's AR answers, item for item
    two = bench("--blocks", "4", "--drafts", "block", "--verifier", str(shipped_base()), "--trace", "2",
                "--images-twice")
    assert two.returncode == 0, two.stderr[-2000:]
    rows = json.loads(two.stdout.strip().splitlines()[-1])["rows"]
    assert set(rows) == {"ar", "B4 block drafter", "B4 block drafter images twice"}
    assert rows["B4 block drafter"]["same_as_ar"] == rows["B4 block drafter images twice"]["same_as_ar"] == 1.0
    assert rows["B4 block drafter"]["tpf"] >= 1.0  # the first draft is exact: one token and the bonus a step
    trace = [line for line in two.stdout.splitlines() if line.startswith("B4 block drafter: drafts accepted")]
    assert len(trace) == 1 and trace[0].count(" / ") == 1  # two prompts' steps
    both = bench("--verifier", str(shipped_base()), "--rules", "off")
    assert both.returncode == 2 and "--verifier" in both.stderr
    alone = bench("--images-twice")
    assert alone.returncode == 2 and "--verifier" in alone.stderr


def test_draft_tree_simulation_follows_the_engine_and_its_branches():
    """`benchmarks/draft_tree.py`: a chain is accepted to its first miss; a branch is followed only at a depth it
    covers, holding the right token, for its continuation's length; the simulated chain is the engine's own
    ``draft="block"`` decoding, token for token (the same tokens per forward)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from bard_core.assets import shipped_base
    from benchmarks.draft_tree import accepted, branched, tree_tokens

    top = torch.tensor([[5, 6], [7, 8], [9, 1], [2, 3]])
    sure = torch.tensor([0.9, 0.5, 0.6, 0.8])
    target = [5, 8, 9, 2]
    assert accepted(top, sure, target, 1, 0, None) == 1  # the chain: 7 ≠ 8
    assert accepted(top, sure, target, 2, 8, None) == 4  # 8 is depth 1's 2nd choice, then 9, 2 on the chain
    assert accepted(top, sure, target, 2, 1, None) == 3  # the branch holds one chain draft after its choice
    assert accepted(top, sure, target, 2, 8, 1) == 4  # depth 1 is the least sure
    assert accepted(top, torch.tensor([0.9, 0.95, 0.5, 0.8]), target, 2, 8, 1) == 1  # depth 2 is: no branch at 1
    assert accepted(top, sure, [5, 4, 9, 2], 2, 8, None) == 1  # the right token is no choice of the drafter's
    assert accepted(top, sure, [5, 7], 2, 8, None) == 2  # the answer ends inside the draft

    out = subprocess.run([sys.executable, "-m", "benchmarks.draft_tree", "--checkpoint", str(shipped_base()),
                          "--verifier", str(shipped_base()), "--items", "2", "--block", "4", "--max-new-tokens", "24"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    chain = result["rows"][0]
    assert chain["tree"] == "chain" and chain["verify_tokens"] == 4
    assert chain["tpf"] == pytest.approx(result["engine_block_tpf"])
    # every depth but the last: a choice and its 3, 2, 1 chain drafts (fewer with a continuation of 1)
    assert tree_tokens(4, 2, 8, branched(sure, 2, None)) == 4 + 4 + 3 + 2
    assert tree_tokens(4, 2, 1, branched(sure, 2, None)) == 4 + 2 + 2 + 2
    assert tree_tokens(4, 3, 8, branched(sure, 3, 1)) == 4 + 2 * 3 and branched(sure, 1, None) == []
    widths = {r["tree"]: r["verify_tokens"] for r in result["rows"]}
    assert widths["2nd choice, every depth, +8"] == 13 and widths["3rd choice too, every depth, +8"] == 22
    assert 4 < widths["2nd choice, 2 least sure, +8"] <= 13
