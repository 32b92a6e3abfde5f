"""Putting clearcri on a node and keeping the node labelled: the installer run by hand or
by the chart's DaemonSet (node_install), the label watcher (node_label)."""
