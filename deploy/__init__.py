"""Putting clearcri on a node and keeping it running and the node labelled: the installer
run by hand or by the chart's DaemonSet (node_install), the daemon's supervisor where no
systemd runs (supervisor), the label watcher (node_label)."""
