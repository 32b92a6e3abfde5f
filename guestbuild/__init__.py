"""Building the guest assets (`clearcri guest build`): the kernel, the initramfs and the
DAX guest OS image, from Debian packages. Not runtime code: the daemon only finds the
built assets (sandbox/guest.py) and never imports this package.

builder.py drives the build and versions it; kernel.py builds our kernel; bzimage.py
(with lz4.py) takes Debian's out of its bzImage; kmod.py handles its modules;
initramfs.py writes the cpio archives, whose ``/init`` is guest_init.sh; osimage.py
shapes the OS image's tree; apt.py resolves and fetches packages; elf.py reads ELF
files; common.py holds what they share.
"""
