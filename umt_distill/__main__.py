"""`python -m umt_distill` (and so `torchrun -m umt_distill ...`)."""

from umt_distill.cli import main

if __name__ == "__main__":
    main()
