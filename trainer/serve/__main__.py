"""`python -m trainer.serve` (`./launch.sh serve`)."""

from trainer.serve.app import main

main()
