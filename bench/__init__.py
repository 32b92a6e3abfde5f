"""`clearcri bench`: benchmarks that boot pod VMs through the sandbox layer, without the
daemon, and print figures measured against a baseline of the same run
(docs/benchmarks.md). Not runtime code: the CLI imports them inside their commands. The
benchmarks that drive the daemon through CRI or kubelet are tests/bench/.
"""
