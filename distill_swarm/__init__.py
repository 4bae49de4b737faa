"""The `distill-swarm` command line and the local demo."""
