"""The planner's RoPE decision: which extension method a run trains with, from measurement and the step budget.

The engine measures (engine.planning.rope_choice: rope-only PPL of each candidate at the target and at a short length,
on held-out text); this role decides with one documented rule:

- The user's `--rope-method` wins, and nothing is measured.
- Fewer than `PI_RECOVERY_STEPS` optimizer steps: training cannot move the model far, so the run keeps what RoPE
  alone gives. Choose the candidate with the lowest rope-only PPL at the target among those within
  `SHORT_TOLERANCE` of the base model's PPL at the short length (all candidates if none is). On SmolLM2-135M x2
  this is YaRN (PPL 10.8 at 16k, 11.9 at 2k, base 11.6) and never linear PI (28.9 at 16k, 29.5 at 2k).
- `PI_RECOVERY_STEPS` or more: training adapts the model to fixed interpolated positions (Position Interpolation,
  Chen et al., 2023, fine-tunes 1,000 steps, as LongLoRA does; YaRN, Peng et al., 2023, fine-tunes in fewer). Choose
  between linear and YaRN by rope-only PPL at the target, the better starting point.
- Dynamic NTK is never measured (`MEASURED_METHODS`): it cannot win what the planner chooses, a method to train and
  then serve. Its frequencies are a function of the current length, so the weights trained at the target run with
  other frequencies at every other length; under a KV cache transformers re-derives them as the cache grows while the
  keys already cached keep their old rotation, so what the evaluator and the server generate is not the model that
  was scored; and neither vLLM nor llama.cpp reproduces it (docs/serving.md). Each of its measurements was a
  forward pass at the target (98 s of the demo's plan stage). `--rope-method dynamic` still runs it.
- Not measured (no weights here, or `longpilot plan`, which runs nothing): the same rule's prior, YaRN with few
  steps and LongLoRA's linear with many, and the card says it was not measured.
"""

from __future__ import annotations

import os
from typing import Any

from engine.catalog import DEFAULT_ROPE_METHOD, FEW_STEPS_ROPE_METHOD, FIXED_POSITION_ROPE_METHODS

PI_RECOVERY_STEPS = 200  # below this many optimizer steps, a training-free method is preferred
SHORT_TOLERANCE = 0.05  # a candidate may cost at most 5% PPL at the short length (the quality gate's ppl ratio)
TRAINED_METHODS = FIXED_POSITION_ROPE_METHODS  # methods with fixed positions that training adapts to
MEASURED_METHODS = FIXED_POSITION_ROPE_METHODS  # what the plan stage scores (dynamic NTK: see the module docstring)


def _ppl(score: dict[str, Any], length: int) -> float | None:
    value = score["ppl"].get(str(length))
    return None if value is None else float(value)


def _measured_choice(scores: dict[str, Any], steps: int) -> tuple[str, str]:
    """(method, why) from the rope-only scores (RopeScores.to_dict()) and the number of optimizer steps."""
    target, short = scores["target"], scores["short"]
    base_short = _ppl(scores["base"], short)
    at_target = [c for c in scores["candidates"] if _ppl(c, target) is not None]
    if not at_target:
        raise ValueError("no candidate was scored at the target")
    if steps < PI_RECOVERY_STEPS:
        ok = [c for c in at_target if _ppl(c, short) <= base_short * (1 + SHORT_TOLERANCE)] or at_target
        best = min(ok, key=lambda c: _ppl(c, target))
        why = (f"{steps} optimizer step(s) < {PI_RECOVERY_STEPS}: too few to recover from interpolation, so the run "
               f"keeps what RoPE alone gives; {best['method']} has the lowest rope-only PPL at {target:,} "
               f"({_ppl(best, target):.2f}) within {SHORT_TOLERANCE:.0%} of the base at {short:,} "
               f"({base_short:.2f})")  # fmt: skip
        return best["method"], why
    trained = [c for c in at_target if c["method"] in TRAINED_METHODS] or at_target
    best = min(trained, key=lambda c: _ppl(c, target))
    why = (f"{steps} optimizer steps >= {PI_RECOVERY_STEPS}: training adapts to fixed positions, so the better "
           f"starting point of {' and '.join(c['method'] for c in trained)} is chosen: {best['method']}, rope-only "
           f"PPL {_ppl(best, target):.2f} at {target:,}")  # fmt: skip
    return best["method"], why


def scoring_plan(steps: int) -> dict[str, Any]:
    """What to measure for this many steps (engine.planning.rope_choice options): the methods a run can train and
    serve; with few steps a candidate that fails the short-length tolerance skips the (costly) target."""
    from engine.planning.rope_choice import DEFAULT_CANDIDATES

    candidates = tuple(c for c in DEFAULT_CANDIDATES if c.method in MEASURED_METHODS)
    return {"candidates": candidates, "screen": SHORT_TOLERANCE if steps < PI_RECOVERY_STEPS else None}


def prior_method(steps: int) -> str:
    """The rule without measurements: a training-free method for a handful of steps, LongLoRA's PI otherwise."""
    return FEW_STEPS_ROPE_METHOD if steps < PI_RECOVERY_STEPS else DEFAULT_ROPE_METHOD


def choose_rope(steps: int, user_method: str | None = None, scores: dict[str, Any] | None = None,
                not_measured: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The plan's `rope_choice` record: the method, who chose it (user, measured, prior), why, and the scores."""
    rule = {"pi_recovery_steps": PI_RECOVERY_STEPS, "short_tolerance": SHORT_TOLERANCE, "steps": steps}
    if user_method:
        return {"method": user_method, "by": "user", "reason": "your choice (--rope-method); nothing measured",
                "rule": rule, "scores": None}  # fmt: skip
    if scores:
        method, why = _measured_choice(scores, steps)
        return {"method": method, "by": "measured", "reason": why, "rule": rule, "scores": scores}
    method = prior_method(steps)
    kind = "a training-free method" if steps < PI_RECOVERY_STEPS else "LongLoRA's Position Interpolation"
    why = f"not measured ({not_measured or 'planning only'}); the rule's prior for {steps} step(s): {kind}"
    return {"method": method, "by": "prior", "reason": why, "rule": rule, "scores": None}


def score_line(scores: dict[str, Any]) -> str:
    """`base 11.63/-, linear 29.46/-, yarn 11.88/10.81, ...`: rope-only PPL at the short length / at the target."""
    short, target = scores["short"], scores["target"]

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    parts = [f"{'base' if s['method'] == 'none' else s['method']} {fmt(_ppl(s, short))}/{fmt(_ppl(s, target))}"
             for s in [scores["base"], *scores["candidates"]]]  # fmt: skip
    return f"rope-only PPL at {short:,}/{target:,}: " + ", ".join(parts)


def rope_card_lines(plan: dict[str, Any]) -> list[str]:
    """The plan card's RoPE lines: the choice, why, and the measured figures with what they cost."""
    choice = plan.get("rope_choice") or {}
    if not choice:
        return []
    lines = [f"  RoPE choice ({choice['by']}): {choice['method']}: {choice['reason']}"]
    if scores := choice.get("scores"):
        lines.append(f"    {score_line(scores)} ({scores['tokens']:,} held-out tokens, {scores['short_tokens']:,} at "
                     f"{scores['short']:,}; measured in {scores['seconds']:.0f} s on {scores['device']})")  # fmt: skip
    return lines


def scoring_short_length(evaluation: dict[str, Any]) -> int:
    """The short length the candidates are scored at: the evaluation's shortest, so the figures line up."""
    return min(evaluation["lengths"])


SCORING_ENV = "LONGPILOT_ROPE_SCORING"  # "off": the plan stage uses the prior (the test suite sets it)
# Windows scored at the short length: a screen, not the evaluation (that scores more). Windows overlap by one token
# (engine.evaluation.perplexity.windows caps the stride at W - 1), so n windows of W cover n(W - 1) + 1 tokens; these
# are the evaluator's first n windows on the same held-out stream, which it then reads back from the results cache.
SHORT_SAMPLE_WINDOWS = 2


def measure(spec, plan_doc: dict[str, Any], steps: int, on_event=None) -> dict[str, Any]:
    """Score the candidates for this spec (engine.planning.rope_choice) and choose; a failure to measure (no weights,
    too little text, out of memory) is recorded as the reason and the prior is used, never a failed plan.
    `on_event` gets the scoring's progress (method, length, windows done), so the plan stage is never silent."""
    from engine.planning.rope_choice import score_model

    if os.environ.get(SCORING_ENV, "on").lower() == "off":  # the test suite: minutes per real-model plan otherwise
        return choose_rope(steps, not_measured=f"RoPE scoring is off (${SCORING_ENV}=off)")
    device = None if spec.device == "auto" else spec.device
    short = scoring_short_length(plan_doc["evaluation"])
    try:
        scores = score_model(spec.base_model, spec.target_context, short, spec.corpus or None, device=device,
                             short_tokens=SHORT_SAMPLE_WINDOWS * (short - 1) + 1, on_event=on_event,
                             **scoring_plan(steps))  # fmt: skip
        return choose_rope(steps, scores=scores.to_dict())
    except (ValueError, OSError, RuntimeError) as err:
        return choose_rope(steps, not_measured=str(err).splitlines()[0][:200])
