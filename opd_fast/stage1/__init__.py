"""Stage 1: one task's teacher trained by diffusion RL on the task's reward (`opd-fast teach`); its export is a
teacher that a run config's tasks.N.teacher.path reads (stage 2).

    config.py     TeachConfig (a RunConfig: the same parts, engines, checkpoints) and its method sections
    flow_grpo.py  Flow-GRPO's math: group advantages, the clipped-ratio loss, GRPO-Guard's ratio normalisation
    nft.py        DiffusionNFT's math: the optimality weight and the implicit positive / negative loss
    rewards.py    the reward of a teach run (the registry's, or the demo world's `demo`) and the images it scores
    trainer.py    TeachTrainer: the OPD Trainer's run (folder, checkpoints, resume, export) with stage-1 rounds
    pipeline.py   `opd-fast pipeline`: stage 1 for every teacher that does not exist yet, then stage 2 with them
    cli.py        the `teach` and `pipeline` subcommands
"""
