"""finetune's Hydra sweeper plugin: hydra/sweeper=optuna, an Optuna (>= 4) search with pruning, N trials in flight
and one study shared by many workers (see docs/search.md)."""
