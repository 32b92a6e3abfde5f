"""`clearcri bench`: benchmarks that boot pod VMs through the sandbox layer, without the
daemon, and print figures measured against a baseline of the same run (docs/benchmarks.md):
boot.py (boot time against the bare-kernel floor, host memory per VM), density.py (idle
pods added up to a count), overhead.py (what QEMU costs a pod's cgroup beyond the guest's
RAM). Not runtime code: the CLI imports them inside their commands. The benchmarks that
drive the daemon through CRI or kubelet are tests/bench/.
"""
