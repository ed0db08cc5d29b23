"""`python -m trainer.evaluate` (`./launch.sh eval`)."""

from trainer.evaluate.evaluate import main

main()
