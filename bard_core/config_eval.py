"""How a stage decodes (`DecodeConfig`) and how its gate judges it (`GateConfig`): two parts of a `Recipe`
(`bard_core.config`), standard library only. Measurements behind the defaults: docs/decoding.md, docs/evaluation.md."""

from __future__ import annotations

from dataclasses import dataclass, field

from bard_core.config_checks import check_choice, check_positive, fail

DECODE_MODES = ("dynamic", "static", "speculative")
DECODE_FALLBACKS = ("leftmost", "confident")
DRAFT_WIDTHS = ("adaptive", "block", "wide")


def _opt(default, help: str, **kwargs):
    """A field with its one-line meaning (the CLI's flag help, `flows/cli_decode.add_decode_flags`)."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class DecodeConfig:
    """Block-diffusion decoding (METHOD.md §6); measurements behind the defaults: docs/decoding.md."""

    block_size: int = _opt(32, "tokens decoded per block")
    mode: str = _opt("dynamic", "dynamic: commit every position above the threshold; static: a fixed number "
                     "per step; speculative: draft a block, verify it causally, output identical to AR greedy",
                     choices=DECODE_MODES)
    threshold: float = _opt(0.9, "dynamic mode: commit a position whose top probability clears this")
    fallback: str = _opt("leftmost", "dynamic mode, when no position clears the threshold: commit the leftmost "
                         "masked one or the most confident", choices=DECODE_FALLBACKS)
    sure_eos: bool = _opt(True, "dynamic mode: propose <|im_end|> only above the threshold (it ends the answer for "
                          "good); elsewhere the position's next best token")
    draft: str = _opt("adaptive", "speculative mode: masks drafted per step: the block size, or adaptive (from 8, "
                      "doubled after a step in which every row accepted every draft, halved — not under 8 — when the rows "
                      "gained a quarter of it or less), or wide (the first step at the block size — an answer's opening, "
                      "where a good drafter's drafts run longest — then adaptive from 8)", choices=DRAFT_WIDTHS)
    tokens_per_step: int = _opt(1, "static mode: positions committed per forward")
    edit_threshold: float = _opt(0.95, "correction: replace a visible token when another clears this")
    max_edits_per_position: int = _opt(1, "correction: edits allowed per position")
    max_steps_per_block: int | None = _opt(None, "forwards allowed per block (None: the block size)")
    max_new_tokens: int = _opt(128, "answer length cap")
    temperature: float = _opt(0.0, "0: greedy")
    top_p: float = _opt(1.0, "nucleus sampling mass (with temperature > 0)")
    batch_size: int = _opt(16, "prompts decoded together")
    label_shift: bool = _opt(False, "must match the checkpoint's training (bard.json label_shift)")
    finish_at_eos: bool = _opt(True, "stop a row's block at a visible <|im_end|> (the positions after it are "
                               "discarded anyway)")

    def __post_init__(self) -> None:
        c = "DecodeConfig"
        check_choice(c, "mode", self.mode, DECODE_MODES)
        check_choice(c, "fallback", self.fallback, DECODE_FALLBACKS)
        check_choice(c, "draft", self.draft, DRAFT_WIDTHS)
        check_positive(c, block_size=self.block_size, tokens_per_step=self.tokens_per_step,
                        max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        if not 0.0 <= self.threshold <= 1.0:
            fail(c, "threshold", self.threshold, "a probability in [0, 1]")
        if not 0.0 <= self.edit_threshold <= 1.0:
            fail(c, "edit_threshold", self.edit_threshold, "a probability in [0, 1]")
        if self.max_edits_per_position < 0:
            fail(c, "max_edits_per_position", self.max_edits_per_position, "a non-negative int")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            fail(c, "temperature/top_p", (self.temperature, self.top_p), "temperature >= 0 and top_p in (0, 1]")
        if self.mode == "speculative" and self.temperature != 0:
            fail(c, "temperature", self.temperature, "0 in speculative mode (lossless for greedy decoding only)")
        if self.tokens_per_step > self.block_size:
            fail(c, "tokens_per_step", self.tokens_per_step, f"<= block_size={self.block_size}")
        if self.sure_eos and self.mode == "dynamic" and self.threshold >= 1.0:
            fail(c, "threshold", self.threshold, "< 1 with sure_eos (no EOS could ever be proposed); "
                 "or set sure_eos=False")


@dataclass(frozen=True)
class GateConfig:
    """Promotion policy: accuracy within `tolerance` of the AR baseline and a minimum decode speed."""

    benchmarks: tuple[str, ...] = ("shapes_mcq", "shapes_yesno", "shapes_count", "shapes_ocr", "shapes_extract")
    tolerance: dict[str, float] = field(default_factory=dict)  # per benchmark; default_tolerance otherwise
    default_tolerance: float = 0.03
    speed_benchmark: str = "shapes_extract"
    min_tpf: dict[int, float] = field(default_factory=lambda: {4: 1.5, 8: 2.0, 16: 2.5, 32: 3.0})
    limit: int | None = None  # items per benchmark (None: all)
    # decoding thresholds evaluated per stage; the gate promotes the passing one with the most tokens per
    # forward and writes it into the promoted checkpoint (bard.json "decode")
    thresholds: tuple[float, ...] = (0.9,)
    speed_items: int = 32  # items of the speed benchmark decoded at batch 1 (AR beside); batch N: 4 batches
    # 0: a stage passes when its paired drop is within tolerance; > 0: when drop + z·se is (one-sided
    # non-inferiority, e.g. 1.645 for 95%), which needs far more items than a CPU evaluation has
    z: float = 0.0
    # beside each stage, the lossless mode (speculative decoding verified by the AR base: its answers exactly)
    # on the speed benchmark's items: tokens/s at batch 1 and N and the share of answers identical to the AR
    # base's; reported, not gated (docs/decoding.md, "Lossless mode")
    lossless: bool = True
    # one more setting in the sweep: the stage's own speculative mode (drafted in blocks, verified by its own
    # causal view: its AR-order greedy answers, gated like any setting); promoted when it passes with the most
    # tokens per forward (docs/decoding.md, "The stage's own speculative mode in the gate")
    speculative: bool = True
    # one more setting: the stage as the AR base's drafter (blocks drafted by the stage, verified by the AR base:
    # the base's greedy answers, gated like every setting); promoted with the base as its verifier, whom
    # `bard generate` / `bard eval` then load (docs/decoding.md, "The stage as the AR base's drafter")
    drafter: bool = False

    def __post_init__(self) -> None:
        c = "GateConfig"
        try:  # block sizes arrive as strings from JSON overrides (CLI, UI forms)
            object.__setattr__(self, "min_tpf", {int(b): float(v) for b, v in self.min_tpf.items()})
        except (TypeError, ValueError):
            fail(c, "min_tpf", self.min_tpf, "a map of block size -> minimum tokens per forward")
        if not self.benchmarks:
            fail(c, "benchmarks", self.benchmarks, "at least one benchmark")
        unknown = set(self.tolerance) - set(self.benchmarks)
        if unknown:
            fail(c, "tolerance", sorted(unknown), f"keys among the gate benchmarks {list(self.benchmarks)}")
        if self.default_tolerance < 0 or any(v < 0 for v in self.tolerance.values()):
            fail(c, "tolerance", self.tolerance, "non-negative tolerances")
        if self.speed_benchmark not in self.benchmarks:
            fail(c, "speed_benchmark", self.speed_benchmark, f"one of {list(self.benchmarks)}")
        if not self.thresholds or not all(0.0 < t < 1.0 for t in self.thresholds):
            fail(c, "thresholds", self.thresholds, "one or more decoding thresholds in (0, 1)")
        if self.limit is not None and self.limit < 1:
            fail(c, "limit", self.limit, "None (every item) or a positive int")
        if self.speed_items < 1 or self.z < 0:
            fail(c, "speed_items/z", (self.speed_items, self.z), "speed_items >= 1 and z >= 0")

    def tolerance_for(self, benchmark: str) -> float:
        return self.tolerance.get(benchmark, self.default_tolerance)
