"""Ablations (issue 24): the paper's claims and our departures as variants of one recipe, each a pipeline run
with overrides at the same total training budget, and the verdict on each claim with its noise.

A `Variant` changes settings (`overrides`) and/or the schedule (``direct``: the last block size straight from
the AR base; ``first_last``: the first and the last). `plan` turns a variant into a run's schedule and
per-stage step counts so that every variant trains the same number of steps in all; `compare` judges a
variant's paired per-item results against the reference's over seeds, `at_equal_speed` the same at one
speed. Standard library only (flows import it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from bard_core.config import Recipe

SPEED_TOLERANCE = 0.1  # two settings are at the same speed when their TPFs differ by at most this share


@dataclass(frozen=True)
class Claim:
    key: str
    statement: str  # what the reference is claimed to do better than the variants that test it


@dataclass(frozen=True)
class Variant:
    name: str
    claim: str  # Claim.key; "" for the reference
    what: str
    overrides: dict[str, str] = field(default_factory=dict)
    schedule: str = "reference"  # reference | direct | first_last

    @property
    def decode_only(self) -> bool:
        """True when only decoding changes: the run reuses the reference's trained stages."""
        return self.schedule == "reference" and bool(self.overrides) and all(k.startswith("decode.")
                                                                              for k in self.overrides)


CLAIMS = {c.key: c for c in (
    Claim("progressive", "progressive merging (every block size in turn) beats jumping straight to large blocks"),
    Claim("teacher", "distilling from the previous stage beats distilling from the AR model, or not distilling"),
    Claim("noise", "mixed noise with correction decoding beats mask-only noise, and correction earns its place"),
    Claim("keep_loss", "our departure: loss on the noisy copy's kept tokens (train.keep_loss_weight)"),
    Claim("anchor", "our departure: the AR anchor (train.anchor_weight)"),
    Claim("prefix_noise", "our departure: prefix noise (noise.prefix_prob)"),
    Claim("label_shift", "our departure: shifted labels (train.label_shift; the AR anchor needs them)"),
    Claim("fallback", "our departure: the leftmost fallback (decode.fallback)"),
    Claim("sure_eos", "our departure: a sure end of answer (decode.sure_eos)"),
)}

VARIANTS = {v.name: v for v in (
    Variant("reference", "", "the recipe as it is: progressive, previous-stage teacher, its noise and decoding"),
    Variant("direct", "progressive", "the last block size straight from the AR base, all steps in one stage",
            schedule="direct"),
    Variant("first_last", "progressive", "the first block size, then the last, e.g. 4 → 32", schedule="first_last"),
    Variant("teacher_ar", "teacher", "distil from the AR base, its causal view, instead of the previous stage",
            {"train.teacher": "ar"}),
    Variant("teacher_none", "teacher", "no distillation: its steps go to merging", {"train.teacher": "none"}),
    Variant("mask_noise", "noise", "mask-only noise", {"noise.kind": "mask"}),
    Variant("no_correction", "noise", "no correction when decoding: no visible token is replaced",
            {"decode.max_edits_per_position": "0"}),
    Variant("no_keep_loss", "keep_loss", "loss on corrupted tokens only", {"train.keep_loss_weight": "0"}),
    Variant("no_anchor", "anchor", "no AR anchor", {"train.anchor_weight": "0"}),
    Variant("no_prefix_noise", "prefix_noise", "i.i.d. noise only", {"noise.prefix_prob": "0"}),
    Variant("no_label_shift", "label_shift", "unshifted labels, and so no AR anchor",
            {"train.label_shift": "false", "train.anchor_weight": "0"}),
    Variant("confident_fallback", "fallback", "commit the most confident position when none clears τ",
            {"decode.fallback": "confident"}),
    Variant("no_sure_eos", "sure_eos", "propose <|im_end|> like any token", {"decode.sure_eos": "false"}),
)}


def stage_steps(recipe: Recipe, schedule: tuple[int, ...], teacher: str | None = None) -> list[dict]:
    """A run's stages: block size, merge and distill steps, merge rate, and whether it has a teacher (with
    ``train.teacher`` = `teacher`, default the recipe's). A stage without one trains no distill steps."""
    teacher = teacher or recipe.train.teacher
    out = []
    for k, B in enumerate(schedule):
        t = recipe.train.for_stage(B)
        has = teacher == "ar" or (teacher == "previous" and k > 0)
        out.append({"block_size": B, "merge": t.merge_steps, "distill": t.distill_steps if has else 0, "lr": t.lr,
                    "teacher": has})
    return out


def plan(variant: Variant, recipe: Recipe, schedule: tuple[int, ...]) -> tuple[list[int], dict[int, dict[str, str]]]:
    """A variant's schedule and per-stage step and rate overrides, at the reference run's total steps.

    `recipe` and `schedule` are the reference's. A stage without a teacher in the variant trains its distill
    steps as merge steps; a schedule that drops stages gives their steps to its last stage (at that stage's
    rate; ``direct`` at the first stage's: it starts from the AR base as that stage does)."""
    reference = stage_steps(recipe, schedule)
    total = sum(s["merge"] + s["distill"] for s in reference)
    if variant.schedule == "direct":
        sizes = (schedule[-1],)
    elif variant.schedule == "first_last":
        if len(schedule) < 3:
            raise ValueError(f"variant {variant.name}: the schedule {list(schedule)} has no stage between its first "
                             "and last")
        sizes = (schedule[0], schedule[-1])
    else:
        sizes = tuple(schedule)
    own = stage_steps(recipe, sizes, variant.overrides.get("train.teacher"))
    out: dict[int, dict] = {}
    for s in own:
        ref = next(r for r in reference if r["block_size"] == s["block_size"])
        distill = ref["distill"] if s["teacher"] else 0
        out[s["block_size"]] = {"merge": ref["merge"] + ref["distill"] - distill, "distill": distill, "lr": ref["lr"]}
    out[sizes[-1]]["merge"] += total - sum(s["merge"] + s["distill"] for s in out.values())
    if variant.schedule == "direct":
        out[sizes[-1]]["lr"] = reference[0]["lr"]
    return list(sizes), {B: {"train.merge_steps": str(s["merge"]), "train.distill_steps": str(s["distill"]),
                             "train.lr": str(s["lr"])} for B, s in out.items()}


def as_reference(variant: Variant, recipe_name: str, overrides: dict[str, str], schedule: tuple[int, ...]) -> str | None:
    """Why `variant` would train and decode exactly as the reference does on this recipe (its run would be the
    reference's, and its claim untested: e.g. `mask_noise` on a recipe with mask noise, a teacher where no stage
    distils), or None when it changes something. `overrides`: every run's; `schedule`: the reference's."""
    from bard_core.recipes import get_recipe

    if variant.schedule != "reference" or not variant.overrides:
        return None  # a schedule variant changes the stages; the reference is itself

    def stages(extra: dict[str, str], v: Variant) -> list:
        sizes, per_stage = plan(v, get_recipe(recipe_name, {**overrides, **extra}), schedule)
        out = []
        for B in sizes:
            r = get_recipe(recipe_name, {**overrides, **extra, **per_stage[B]})
            t = r.train.for_stage(B)
            out.append((B, replace(r, train=t if t.distill_steps else replace(t, teacher="none"))))
        return out  # a stage with no distill steps never reads its teacher

    if stages(variant.overrides, variant) != stages({}, VARIANTS["reference"]):
        return None
    own = [f"{k}={v}" for k, v in variant.overrides.items()
           if get_recipe(recipe_name, {**overrides, k: v}) == get_recipe(recipe_name, overrides)]
    unused = [f"{k}={v}" for k, v in variant.overrides.items() if f"{k}={v}" not in own]
    return "; ".join(([f"{recipe_name} already has {', '.join(own)}"] if own else [])
                     + ([f"no stage reads {', '.join(unused)} (no stage distils)"] if unused else []))


@dataclass(frozen=True)
class Comparison:
    claim: str
    variant: str
    gain: float  # reference − variant, mean score in points over every paired item (positive: reference better)
    se: float  # its standard error: over seeds when there are two or more (at least the items'), else the items'
    seeds: int
    n: int  # paired items per seed
    tpf: tuple[float, float]  # final-stage TPF on the speed benchmark: reference, variant (means over seeds)
    steps: tuple[tuple[int, ...], tuple[int, ...]]  # training steps per seed: reference, variant
    # at equal speed (`at_equal_speed`): the decoding thresholds compared per seed (reference's, variant's) and
    # the largest relative TPF difference of a pair; None: at the gate's thresholds
    thresholds: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    speed_gap: float = 0.0
    measure: str = "score"  # "score": gain in points of mean score; "tpf": in percent of TPF (`compare_speed`)

    @property
    def equal_budget(self) -> bool:
        return self.steps[0] == self.steps[1]

    @property
    def verdict(self) -> str:
        if not self.equal_budget:  # a claim is about one choice at one budget (docs/ablation.md, the budget bug)
            return "no verdict: unequal budget"
        if self.speed_gap > SPEED_TOLERANCE:
            return "no verdict: no setting at the same speed"
        if math.isnan(self.gain) or abs(self.gain) <= 2 * self.se:
            return "inside the noise"
        return "held" if self.gain > 0 else "did not hold"

    def sentence(self) -> str:
        v = VARIANTS[self.variant]
        if self.measure == "tpf":
            return (f"**{self.verdict}** — at the promoted lossless setting, where every answer is the verifier's, "
                    f"reference vs `{self.variant}`: TPF {self.tpf[0]:.2f} vs {self.tpf[1]:.2f}, {self.gain:+.1f} ± "
                    f"{self.se:.1f}% for the reference ({self.n} paired items of the speed benchmark, {self.seeds} "
                    f"seed{'s' if self.seeds != 1 else ''})")
        if self.thresholds is not None:
            taus = ["/".join(dict.fromkeys(f"{t:g}" for t in side)) for side in self.thresholds]
            return (f"**{self.verdict}** — at equal speed, reference vs `{self.variant}`: {self.gain:+.1f} ± "
                    f"{self.se:.1f} points for the reference (mean score, {self.n} paired items, {self.seeds} seed"
                    f"{'s' if self.seeds != 1 else ''}); TPF {self.tpf[0]:.2f} at τ {taus[0]} vs {self.tpf[1]:.2f} at "
                    f"τ {taus[1]}" + (f"; the nearest speeds differ by {100 * self.speed_gap:.0f}% (more than "
                                       f"{100 * SPEED_TOLERANCE:.0f}%)" if self.speed_gap > SPEED_TOLERANCE else ""))
        return (f"**{self.verdict}** — reference vs `{self.variant}` ({v.what}): {self.gain:+.1f} ± {self.se:.1f} "
                f"points for the reference (mean score, {self.n} paired items, {self.seeds} seed"
                f"{'s' if self.seeds != 1 else ''}); TPF {self.tpf[0]:.2f} vs {self.tpf[1]:.2f}"
                + ("" if self.equal_budget else f"; `{self.variant}` trained {', '.join(map(str, self.steps[1]))} steps "
                   f"against the reference's {', '.join(map(str, self.steps[0]))} (per seed)"))


def compare(variant: str, reference: list[dict[str, float]], other: list[dict[str, float]],
            tpf: tuple[list[float], list[float]], steps: tuple[list[int], list[int]]) -> Comparison:
    """`reference`/`other`: per seed, item key → primary metric at the final stage (the same keys, paired);
    `steps`: per seed, the training steps each took (a difference withholds the verdict)."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"{variant}: {len(other)} seeds against the reference's {len(reference)}")
    if not len(steps[0]) == len(steps[1]) == len(reference):  # no count is not an equal budget
        raise ValueError(f"{variant}: step counts for {len(steps[0])} and {len(steps[1])} seeds, "
                         f"scores for {len(reference)}")
    gains, item_se, n = [], [], None
    for ref, oth in zip(reference, other):
        keys = [k for k in ref if k in oth]
        if len(keys) != len(ref):
            raise ValueError(f"{variant}: {len(ref) - len(keys)} of the reference's items are missing")
        diffs = [100 * (ref[k] - oth[k]) for k in keys]
        mean = sum(diffs) / len(diffs)
        var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else 0.0
        gains.append(mean)
        item_se.append(math.sqrt(var / len(diffs)))
        n = len(keys)
    gain, se = _pooled(gains, item_se)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return Comparison(VARIANTS[variant].claim, variant, gain, se, len(gains), n or 0, (mean(tpf[0]), mean(tpf[1])),
                      (tuple(steps[0]), tuple(steps[1])))


def _pooled(gains: list[float], item_se: list[float]) -> tuple[float, float]:
    """The mean of per-seed gains and its standard error: the items' noise, or the spread over seeds if larger."""
    gain = sum(gains) / len(gains)
    se = math.sqrt(sum(s * s for s in item_se) / len(item_se) / len(item_se))
    if len(gains) > 1:
        se = max(se, math.sqrt(sum((g - gain) ** 2 for g in gains) / (len(gains) - 1) / len(gains)))
    return gain, se


def compare_speed(variant: str, reference: list[dict[str, tuple[int, int]]], other: list[dict[str, tuple[int, int]]],
                  steps: tuple[list[int], list[int]]) -> Comparison:
    """The comparison when both sides' promoted setting is lossless (answers the verifier's, so no score differs):
    by speed. `reference`/`other`: per seed, speed-benchmark item → (tokens, forwards). Gain: the reference's TPF
    over the variant's, in percent (positive: the reference is faster); its error by the delta method over the
    paired items (docs/ablation.md, "A lossless setting is judged on speed")."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"{variant}: {len(other)} seeds against the reference's {len(reference)}")
    if not len(steps[0]) == len(steps[1]) == len(reference):
        raise ValueError(f"{variant}: step counts for {len(steps[0])} and {len(steps[1])} seeds, "
                         f"forwards for {len(reference)}")
    gains, item_se, tpf = [], [], ([], [])
    for ref, oth in zip(reference, other):
        keys = [k for k in ref if k in oth]
        if len(keys) != len(ref) or len(keys) < 2:
            raise ValueError(f"{variant}: {len(ref) - len(keys)} of the reference's {len(ref)} speed items are missing")
        (tr, nr), (tv, nv) = ([sum(side[k][i] for k in keys) for i in (0, 1)] for side in (ref, oth))
        scale = tr / tv  # 1 when both answer alike, as lossless settings with one verifier do
        ratio = scale * nv / nr  # reference's TPF / variant's
        resid = [scale * oth[k][1] - ratio * ref[k][1] for k in keys]
        se = math.sqrt(sum(d * d for d in resid) * len(keys) / (len(keys) - 1)) / nr
        gains.append(100 * (ratio - 1))
        item_se.append(100 * se)
        tpf[0].append(tr / nr)
        tpf[1].append(tv / nv)
    gain, se = _pooled(gains, item_se)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return Comparison(VARIANTS[variant].claim, variant, gain, se, len(gains), len(keys), (mean(tpf[0]), mean(tpf[1])),
                      (tuple(steps[0]), tuple(steps[1])), measure="tpf")


def at_equal_speed(variant: str, reference: list[list[dict]], other: list[list[dict]],
                   steps: tuple[list[int], list[int]], threshold: float | None = None) -> Comparison:
    """The comparison at one speed. `reference`/`other`: per seed, the final stage's points (``threshold``,
    ``tpf``, ``items``), the gate's first. Per seed the faster side stays at its gate point and the slower side
    is taken at its point of the nearest TPF: does the slower side's accuracy survive going as fast? With
    `threshold`, the variant's point there instead, against the reference's point of the nearest TPF."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"{variant}: {len(other)} seeds against the reference's {len(reference)}")
    nearest = lambda points, to: min(points, key=lambda p: abs(p["tpf"] - to["tpf"]))  # noqa: E731
    pairs = []
    for ref, oth in zip(reference, other):
        if threshold is not None:
            mine = next((p for p in oth if p["threshold"] == threshold), None)
            if mine is None:
                raise ValueError(f"{variant}: no point at τ {threshold:g}")
            pairs.append((nearest(ref, mine), mine))
        elif ref[0]["tpf"] >= oth[0]["tpf"]:
            pairs.append((ref[0], nearest(oth, ref[0])))
        else:
            pairs.append((nearest(ref, oth[0]), oth[0]))
    c = compare(variant, [r["items"] for r, _ in pairs], [o["items"] for _, o in pairs],
                ([r["tpf"] for r, _ in pairs], [o["tpf"] for _, o in pairs]), steps)
    gap = max(abs(r["tpf"] - o["tpf"]) / max(r["tpf"], o["tpf"]) for r, o in pairs)
    return replace(c, thresholds=(tuple(r["threshold"] for r, _ in pairs), tuple(o["threshold"] for _, o in pairs)),
                   speed_gap=gap)
