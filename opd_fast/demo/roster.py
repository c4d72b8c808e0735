"""Who is in the demo's comparison: the models (each the name of the stage that makes it) and what each one is, the
stage-2 methods whose reward curves are drawn, and the prompts samples.png shows. The plan (run.py), the stages
(stages.py) and the report (report.py) all read them here."""

from __future__ import annotations

from opd_fast.demo.world import TASKS

TEACHERS = {task: f"teacher/{task}" for task in TASKS}  # task -> the model fine-tuned on its reward
STUDENT, JOINT = "opd-ode", "joint"
OPD_VARIANTS = ("ode", "sde", "ppo-sde")  # the stages opd-<variant>; run.py's trainer overrides say what each is
SDE_NOISE_LEVEL = 0.7  # Flow-GRPO's default a, for the SDE variants

# the report's table, in its row order (the student last, under its baselines)
DESCRIPTIONS = {
    "base": "flow-matching pretraining on generic renders with noisy captions",
    "teacher/composition": "stage 1: fine-tuning on composition-reward-filtered renders",
    "teacher/glyph": "stage 1: the same, glyph reward",
    "teacher/aesthetic": "stage 1: the same, aesthetic reward",
    "joint": "baseline: the stage-1 method on all three rewards at once, from the base",
    "offpolicy": "baseline: off-policy distillation (flow matching on teacher samples)",
    "opd-ppo-sde": "baseline: OPD with the PPO-style surrogate, SDE rollouts, the student's optimizer",
    "opd-sde": "OPD, closed-form KL, SDE rollouts",
    "opd-ode": "**the student**: OPD, ODE rollouts (the official default)",
}
# the same models in the order the plan schedules their evaluations (the order only sets when each one runs)
EVALUATED = ("base", *TEACHERS.values(), JOINT, "offpolicy", *(f"opd-{v}" for v in OPD_VARIANTS))
CURVES = ("opd-ode", "opd-sde", "opd-ppo-sde", "offpolicy", "joint")  # stage-2 methods on the OPD budget
SAMPLE_PROMPTS = {  # samples.png's columns, per task; each is one of world.task_prompts(task)
    "composition": ["two red blocks on the left", "three blue blocks on the top"],
    "glyph": ['a sign saying "t"', 'a poster reading "z"'],
    "aesthetic": ["a calm sunset", "a quiet ocean"],
}
