"""A pupil node: learns from the master's lessons and answers jobs."""

from distill_swarm.origin import check_installation

check_installation()  # another installation's `shared` or `master` fails here, in one line
