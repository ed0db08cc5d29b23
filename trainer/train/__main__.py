"""`python -m trainer.train` (every rank runs it; `./launch.sh train` starts them)."""

from trainer.train.main import main

main()
