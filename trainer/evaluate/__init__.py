"""`./launch.sh eval`: fast-decode speed and quality of a HAMburger model against its base."""
