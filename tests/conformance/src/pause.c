/*
 * The pause program of the conformance image set: block until SIGTERM or SIGINT, then
 * exit 0, reaping any child that gets re-parented to it meanwhile. Built with -static so
 * the image needs no libc.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>

int main(void)
{
    sigset_t wanted;
    int sig = 0;

    sigemptyset(&wanted);
    sigaddset(&wanted, SIGTERM);
    sigaddset(&wanted, SIGINT);
    sigaddset(&wanted, SIGCHLD);
    sigprocmask(SIG_BLOCK, &wanted, NULL);
    for (;;) {
        if (sigwait(&wanted, &sig) != 0)
            continue;
        if (sig == SIGCHLD) {
            while (waitpid(-1, NULL, WNOHANG) > 0)
                ;
            continue;
        }
        return 0;
    }
}
