/*
 * Installed setuid root in the nonewprivs image: prints the effective uid, so a
 * container run as a non-root user shows 0 when privilege escalation is allowed and
 * its own uid when no_new_privs is set.
 */
#include <stdio.h>
#include <unistd.h>

int main(void)
{
    printf("Effective uid: %u\n", (unsigned)geteuid());
    return 0;
}
