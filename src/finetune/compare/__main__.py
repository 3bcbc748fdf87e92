from finetune.compare.cli import main

main()
