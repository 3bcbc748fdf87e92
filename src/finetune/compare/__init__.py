"""The comparison (finetune-compare): every strategy trained once per seed through Hydra's launcher (`cli`), the
run folders read back and paired (`report`), the statistics that decide (`statistics`), and the report written."""
