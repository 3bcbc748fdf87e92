from finetune.bench.cli import main

main()
