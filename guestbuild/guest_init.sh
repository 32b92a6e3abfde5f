#!/bin/sh
# /init of the clearcri guest initramfs (busybox sh, PID 1).
#
# Loads the kernel modules listed in /etc/clearcri/modules, mounts the guest OS image
# (always the first virtio-pmem device, /dev/pmem0) read-only with DAX, prepares the
# runtime mounts and hands over to the agent with switch_root.
#
# Kernel command line:
#   clearcri.debug=1      print each step with its uptime
#   clearcri.root=DEV     take the OS image from DEV instead (e.g. /dev/vda on virtio-blk,
#                         for comparisons; no DAX there)
#   clearcri.unrandomized_helpers=1
#                         the agent starts its helpers at fixed addresses (a VM under TCG:
#                         agent --unrandomized-helpers)
# Silent otherwise, except one "clearcri-init: ready dax=<0|1>" line; on any failure it
# prints one "clearcri-init: error: ..." line and powers the VM off (it never hangs).

export PATH=/bin
debug=0
uptime=/proc/uptime

fail() {
	echo "clearcri-init: error: $*"
	poweroff -f
	# If power-off did not take, exiting PID 1 panics the kernel; with panic=-1 and
	# qemu -no-reboot that ends the VM as well.
	exit 1
}

step() {
	[ "$debug" = 1 ] || return 0
	read -r now _ <"$uptime"
	echo "clearcri-init: [$now] $*"
}

mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
read -r init_start _ </proc/uptime
read -r cmdline </proc/cmdline
case " $cmdline " in
*" clearcri.debug=1 "*) debug=1 ;;
esac
agent_args=
case " $cmdline " in
*" clearcri.unrandomized_helpers=1 "*) agent_args=--unrandomized-helpers ;;
esac
root_dev=/dev/pmem0
case " $cmdline " in
*" clearcri.root="*)
	root_dev=${cmdline##*clearcri.root=}
	root_dev=${root_dev%% *}
	;;
esac
step "init_start $init_start"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "cannot mount /dev"

load_modules() {
	while read -r module; do
		[ -n "$module" ] || continue
		step "insmod $module"
		insmod "/lib/modules/$module.ko" || fail "cannot load kernel module $module"
	done <"$1"
}

load_modules /etc/clearcri/modules
case "$root_dev" in
/dev/pmem*) root_opts=ro,dax=always ;;
/dev/vd*)
	load_modules /etc/clearcri/modules.blk
	root_opts=ro
	;;
*) root_opts=ro ;;
esac

step "waiting for $root_dev"
read -r now _ <"$uptime"
deadline=$((${now%.*} + 6))
while [ ! -b "$root_dev" ]; do
	read -r now _ <"$uptime"
	[ "${now%.*}" -lt "$deadline" ] ||
		fail "no $root_dev after 5 s: the guest OS image device is missing"
	usleep 10000
done

step "mounting $root_dev on /newroot"
mount -t erofs -o "$root_opts" "$root_dev" /newroot ||
	fail "cannot mount the guest OS image $root_dev (erofs, $root_opts)"

# erofs falls back to non-DAX silently: believe only /proc/mounts.
dax=0
dax_line=""
while read -r m_dev m_dir m_type m_opts m_rest; do
	[ "$m_dir" = /newroot ] || continue
	dax_line="$m_dev $m_dir $m_type $m_opts $m_rest"
	case ",$m_opts," in
	*,dax=always,* | *,dax,*) dax=1 ;;
	*) dax=0 ;;
	esac
done </proc/mounts
step "dax=$dax: $dax_line"

step "runtime mounts"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /newroot/run || fail "cannot mount /run"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /newroot/tmp || fail "cannot mount /tmp"
mount --move /dev /newroot/dev || fail "cannot move /dev"
mkdir -p /newroot/dev/pts /newroot/dev/shm || fail "cannot create /dev/pts, /dev/shm"
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620 devpts /newroot/dev/pts ||
	fail "cannot mount /dev/pts"
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /newroot/dev/shm || fail "cannot mount /dev/shm"
mount --move /proc /newroot/proc || fail "cannot move /proc"
uptime=/newroot/proc/uptime
mount --move /sys /newroot/sys || fail "cannot move /sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /newroot/sys/fs/cgroup ||
	fail "cannot mount cgroup2"

# Delegate every available controller to child cgroups (PID 1 may stay in the root).
read -r controllers </newroot/sys/fs/cgroup/cgroup.controllers
enable=""
for controller in $controllers; do
	enable="$enable +$controller"
done
if [ -n "$enable" ]; then
	echo "$enable" >/newroot/sys/fs/cgroup/cgroup.subtree_control ||
		fail "cannot enable cgroup controllers:$enable"
fi
step "cgroup controllers:$enable"

# The memory policy kubelet sets on every node (vm.overcommit_memory=1): a container
# that allocates past its limit is OOM-killed by its cgroup, as on a node, instead of
# having the allocation refused by the guest's smaller total.
echo 1 >/newroot/proc/sys/vm/overcommit_memory || fail "cannot set vm.overcommit_memory"

# No proactive compaction: kcompactd would wake every 500 ms to score the memory's
# fragmentation, and an idle guest's wake-ups cost the host CPU (under TCG they limit
# how many idle pods a node holds). Compaction when an allocation needs it stays.
echo 0 >/newroot/proc/sys/vm/compaction_proactiveness ||
	fail "cannot set vm.compaction_proactiveness"

# Containers share the VM's network namespace: its loopback must be up.
ip link set lo up || fail "cannot bring up lo"

mkdir -p /newroot/run/clearcri/etc || fail "cannot create /run/clearcri"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >/newroot/run/clearcri/etc/hosts
printf '%s\n%s\n' "$dax" "$dax_line" >/newroot/run/clearcri/dax
read -r switch_time _ <"$uptime"
printf 'init_start %s\nswitch_root %s\n' "$init_start" "$switch_time" \
	>/newroot/run/clearcri/boot-times || fail "cannot write /run/clearcri/boot-times"

[ -x /newroot/usr/bin/python3 ] || fail "the guest OS image has no /usr/bin/python3"
echo "clearcri-init: ready dax=$dax"

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export PYTHONPATH=/usr/lib/clearcri PYTHONDONTWRITEBYTECODE=1
# shellcheck disable=SC2086 # agent_args: no option or one word
exec switch_root /newroot /usr/bin/python3 -S -s -B /usr/lib/clearcri/clearcri-agent $agent_args
fail "switch_root failed"
