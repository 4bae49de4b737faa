"""`python -m distill_swarm` is the `distill-swarm` command."""

from distill_swarm import main

main()
