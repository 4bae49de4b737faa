"""The master: teaches the swarm, stores what pupils report, dispatches jobs."""

from distill_swarm.origin import check_installation

check_installation()  # another installation's `shared` or `pupil_node` fails here, in one line
