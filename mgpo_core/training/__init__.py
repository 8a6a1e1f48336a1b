"""MGPO training on DeepSpeed: the RL loop (`trainer`), one PPO update (`update`), exact-resume checkpoints,
the launched process group (`launch`, `entry`) and checkpoint selection."""
