# The Hydra configs, shipped as package data so a wheel works as well as a checkout (pkg://finetune.configs).
