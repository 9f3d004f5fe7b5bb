"""ConKD's Optuna sweeper: hydra-optuna-sweeper plus pruning, resume to a total, failure budget."""
