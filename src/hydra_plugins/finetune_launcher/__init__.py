"""finetune's Hydra launcher plugin: hydra/launcher=local_processes."""
