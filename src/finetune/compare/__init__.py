"""The comparison (finetune-compare): every strategy trained once per seed through Hydra's launcher (`cli`), the
run folders read back and paired (`report`), the statistics that decide (`statistics`), and the report written.
`head_grid` trains K heads (one per lr and weight decay) in one pass over a cached run's features and scores them
on val, for tuning before anything reads the test split."""
