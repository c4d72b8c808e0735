"""Who is in the demo's comparison: the models (each the name of the stage that makes it) and what each one is, the
stage-2 methods whose reward curves are drawn, and the prompts samples.png shows. The plan (run.py), the stages
(stages.py) and the report (report.py) all read them here."""

from __future__ import annotations

from opd_fast.demo.world import TASKS

TEACHERS = {task: f"teacher/{task}" for task in TASKS}  # task -> the model fine-tuned on its reward
STUDENT, JOINT = "opd-ode", "joint"
OPD_VARIANTS = ("ode", "sde", "ppo-sde")  # the stages opd-<variant>; run.py's trainer overrides say what each is
SDE_NOISE_LEVEL = 0.7  # Flow-GRPO's default a, for the SDE variants

# stage 1 by diffusion RL (opd_fast.stage1, the `teach` stage): a teacher set per method, and the student distilled
# from each set by the student's own trainer run (opd-ode with the teachers swapped)
RL_TEACHERS = {method: {task: f"teacher-{method}/{task}" for task in TASKS} for method in ("grpo", "nft")}
OPD_FROM_RL = {f"opd-ode-{method}": method for method in RL_TEACHERS}
# the cascade baseline: the stage-1 method (DiffusionNFT) on one task after another, each from the previous LoRA;
# the last stage of the chain is the model
CASCADE_METHOD = "nft"
CASCADE = {task: f"cascade/{task}" for task in TASKS[:-1]} | {TASKS[-1]: "cascade"}
# the PPO-style baseline's learning-rate sweep on the same budget (stage -> optimizer.lr; None: the student's, from
# configs/demo.yaml); the table shows the best of those the preset runs
PPO = "opd-ppo-sde"
PPO_SWEEP = {PPO: None, f"{PPO}-lr3e-3": 3e-3, f"{PPO}-lr1e-3": 1e-3}

# the report's table, in its row order (the student last, under its baselines)
DESCRIPTIONS = {
    "base": "flow-matching pretraining on generic renders with noisy captions",
    "teacher/composition": "stage 1: fine-tuning on composition-reward-filtered renders",
    "teacher/glyph": "stage 1: the same, glyph reward",
    "teacher/aesthetic": "stage 1: the same, aesthetic reward",
    "teacher-grpo/composition": "stage 1 by Flow-GRPO-Fast on the composition reward",
    "teacher-grpo/glyph": "stage 1 by Flow-GRPO-Fast, glyph reward",
    "teacher-grpo/aesthetic": "stage 1 by Flow-GRPO-Fast, aesthetic reward",
    "teacher-nft/composition": "stage 1 by DiffusionNFT on the composition reward",
    "teacher-nft/glyph": "stage 1 by DiffusionNFT, glyph reward",
    "teacher-nft/aesthetic": "stage 1 by DiffusionNFT, aesthetic reward",
    "joint": "baseline: the stage-1 method on all three rewards at once, from the base",
    "cascade": "baseline: DiffusionNFT on composition, then glyph, then aesthetic, each from the last LoRA",
    "offpolicy": "baseline: off-policy distillation (flow matching on teacher samples)",
    f"{PPO}-lr1e-3": "baseline: OPD with the PPO-style surrogate, SDE rollouts, lr 1e-3",
    f"{PPO}-lr3e-3": "baseline: OPD with the PPO-style surrogate, SDE rollouts, lr 3e-3",
    PPO: "baseline: OPD with the PPO-style surrogate, SDE rollouts, the student's optimizer",
    "opd-sde": "OPD, closed-form KL, SDE rollouts",
    "opd-ode-nft": "OPD from the DiffusionNFT teachers (the student's run, teachers swapped)",
    "opd-ode-grpo": "OPD from the Flow-GRPO teachers (the student's run, teachers swapped)",
    "opd-ode": "**the student**: OPD, ODE rollouts (the official default)",
}
# the same models in the order the plan schedules their evaluations (the order only sets when each one runs)
EVALUATED = (
    "base",
    *TEACHERS.values(),
    JOINT,
    "offpolicy",
    *(f"opd-{v}" for v in OPD_VARIANTS),
    *(m for m in PPO_SWEEP if m != PPO),
    *(t for teachers in RL_TEACHERS.values() for t in teachers.values()),
    *OPD_FROM_RL,
    CASCADE[TASKS[-1]],
)
CURVES = ("opd-ode", "opd-sde", "opd-ppo-sde", "offpolicy", "joint", *OPD_FROM_RL)  # methods on the OPD budget
SAMPLE_PROMPTS = {  # samples.png's columns, per task; each is one of world.task_prompts(task)
    "composition": ["two red blocks on the left", "three blue blocks on the top"],
    "glyph": ['a sign saying "t"', 'a poster reading "z"'],
    "aesthetic": ["a calm sunset", "a quiet ocean"],
}
