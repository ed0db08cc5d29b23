"""`python -m trainer.export` (`./launch.sh export`)."""

from trainer.export.export import main

main()
