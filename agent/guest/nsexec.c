/*
 * nsexec: start a process in a running container, for the agent's exec.
 *
 * What `crun exec --detach` does for an exec without a terminal, a seccomp profile or
 * a user namespace, as one small static program: under TCG a whole crun start costs
 * hundreds of milliseconds, this a few. The agent (agent/guest/containers.py) falls
 * back to crun for everything else.
 *
 *   nsexec SPEC_FILE
 *
 * SPEC_FILE holds NUL-terminated "key=value" records:
 *   pid=N          the container's init: its namespaces and root are joined
 *   ns=NAME        a namespace to join (ipc, uts, net, cgroup, pid, mnt), any order
 *   cgroup=PATH    a cgroup.procs file to join (each hierarchy of the container)
 *   rlimit=R S H   resource number, soft and hard limit (2^64-1: unlimited)
 *   uid=N gid=N    the process's ids
 *   group=N        a supplementary group (any number of them)
 *   cap=N          a capability to keep (bounding, permitted, effective)
 *   nnp=1          no new privileges
 *   cwd=PATH       working directory in the container
 *   env=K=V        the environment (any number)
 *   arg=A          the command line (any number, in order)
 *   pidfile=PATH   where the started process's pid is written
 *   log=PATH       where a failure is told (stdin, stdout and stderr are the process's)
 * Exit 0 once the process runs (its pid in pidfile); otherwise 1 with the reason in
 * the log, and no process is left behind.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_ITEMS 4096

static char *args[MAX_ITEMS + 1], *envs[MAX_ITEMS + 1], *cgroups[64], *namespaces[8];
static int nargs, nenvs, ncgroups, nnamespaces;
static gid_t groups[MAX_ITEMS];
static int ngroups;
static struct {
    int resource;
    struct rlimit limit;
} rlimits[64];
static int nrlimits;
static unsigned long long caps;
static long pid = -1, uid = -1, gid = -1;
static int nnp;
static const char *cwd = "/", *pidfile, *logfile;
static int log_fd = 2;

static void fail(const char *what) {
    dprintf(log_fd, "nsexec: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void parse(char *data, size_t size) {
    for (char *p = data, *next; p < data + size; p = next) {
        next = p + strlen(p) + 1; /* before the key is cut off below */
        char *value = strchr(p, '=');
        if (value == NULL)
            continue;
        *value++ = '\0';
        if (!strcmp(p, "pid"))
            pid = atol(value);
        else if (!strcmp(p, "ns") && nnamespaces < 8)
            namespaces[nnamespaces++] = value;
        else if (!strcmp(p, "cgroup") && ncgroups < 64)
            cgroups[ncgroups++] = value;
        else if (!strcmp(p, "rlimit") && nrlimits < 64) {
            unsigned long long soft, hard; /* 2^64-1: unlimited, as in OCI */
            if (sscanf(value, "%d %llu %llu", &rlimits[nrlimits].resource, &soft, &hard) == 3) {
                rlimits[nrlimits].limit.rlim_cur = (rlim_t)soft;
                rlimits[nrlimits].limit.rlim_max = (rlim_t)hard;
                nrlimits++;
            }
        } else if (!strcmp(p, "uid"))
            uid = atol(value);
        else if (!strcmp(p, "gid"))
            gid = atol(value);
        else if (!strcmp(p, "group") && ngroups < MAX_ITEMS)
            groups[ngroups++] = (gid_t)atol(value);
        else if (!strcmp(p, "cap")) {
            int cap = atoi(value);
            if (cap >= 0 && cap < 64)
                caps |= 1ULL << cap;
        } else if (!strcmp(p, "nnp"))
            nnp = atoi(value);
        else if (!strcmp(p, "cwd"))
            cwd = value;
        else if (!strcmp(p, "env") && nenvs < MAX_ITEMS)
            envs[nenvs++] = value;
        else if (!strcmp(p, "arg") && nargs < MAX_ITEMS)
            args[nargs++] = value;
        else if (!strcmp(p, "pidfile"))
            pidfile = value;
        else if (!strcmp(p, "log"))
            logfile = value;
    }
}

static char *read_spec(const char *path, size_t *size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail("open spec");
    struct stat st;
    if (fstat(fd, &st) < 0)
        fail("stat spec");
    char *data = malloc((size_t)st.st_size + 1);
    if (data == NULL)
        fail("malloc");
    size_t done = 0;
    while (done < (size_t)st.st_size) {
        ssize_t n = read(fd, data + done, (size_t)st.st_size - done);
        if (n <= 0)
            fail("read spec");
        done += (size_t)n;
    }
    data[done] = '\0';
    close(fd);
    *size = done;
    return data;
}

/* In the child, after the namespaces: limits, ids, capabilities, then the program.
 * A failure is reported as errno on `report` (close-on-exec: EOF means it ran). */
static void become(int report) {
    int step = 0;
    for (int i = 0; i < nrlimits; i++)
        if (setrlimit(rlimits[i].resource, &rlimits[i].limit) < 0)
            goto out;
    step = 1;
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
        goto out;
    for (int cap = 0; cap <= 63; cap++)
        if (!(caps & (1ULL << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            goto out;
    step = 2;
    if (setgroups((size_t)ngroups, groups) < 0 || setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) < 0
        || setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) < 0)
        goto out;
    step = 3;
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {{0}};
    for (int i = 0; i < 2; i++) {
        data[i].effective = data[i].permitted = (__u32)(caps >> (32 * i));
        data[i].inheritable = 0;
    }
    if (syscall(SYS_capset, &header, data) < 0)
        goto out;
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        goto out;
    if (nnp && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        goto out;
    step = 4;
    if (chdir(cwd) < 0)
        goto out;
    step = 5;
    umask(022);
    /* the container's process is laid out at random even when its starter is not
     * (the agent may start its helpers without, see agent/guest/system.py) */
    if (personality(PER_LINUX) < 0)
        goto out;
    clearenv();
    for (int i = 0; i < nenvs; i++)
        putenv(envs[i]);
    execvp(args[0], args);
out:;
    int message[2] = {step, errno};
    if (write(report, message, sizeof message) < 0) {
        /* nothing more to say */
    }
    _exit(127);
}

int main(int argc, char **argv) {
    static const char *steps[] = {"setrlimit", "capability bounding set", "set ids",
                                  "set capabilities", "chdir", "exec"};
    if (argc != 2) {
        fprintf(stderr, "usage: nsexec SPEC_FILE\n");
        return 2;
    }
    size_t size = 0;
    char *spec = read_spec(argv[1], &size);
    parse(spec, size);
    if (logfile != NULL) {
        int fd = open(logfile, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd >= 0)
            log_fd = fd;
    }
    if (pid <= 0 || nargs == 0 || uid < 0 || gid < 0 || pidfile == NULL) {
        dprintf(log_fd, "nsexec: the spec lacks pid, uid, gid, pidfile or args\n");
        return 2;
    }
    args[nargs] = NULL;
    envs[nenvs] = NULL;

    /* opened before the container's root hides it */
    int pid_out = open(pidfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (pid_out < 0)
        fail(pidfile);
    char path[64];
    int fds[8], root = -1, mnt = -1;
    for (int i = 0; i < nnamespaces; i++) {
        snprintf(path, sizeof path, "/proc/%ld/ns/%s", pid, namespaces[i]);
        fds[i] = open(path, O_RDONLY | O_CLOEXEC);
        if (fds[i] < 0)
            fail(path);
        if (!strcmp(namespaces[i], "mnt"))
            mnt = i;
    }
    if (mnt >= 0) {
        snprintf(path, sizeof path, "/proc/%ld/root", pid);
        root = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (root < 0)
            fail(path);
    }
    /* the cgroups first: the process is born in them */
    for (int i = 0; i < ncgroups; i++) {
        int fd = open(cgroups[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || dprintf(fd, "%d\n", getpid()) < 0)
            fail(cgroups[i]);
        close(fd);
    }
    for (int i = 0; i < nnamespaces; i++)
        if (i != mnt && setns(fds[i], 0) < 0)
            fail(namespaces[i]);
    if (mnt >= 0) {
        if (setns(fds[mnt], CLONE_NEWNS) < 0)
            fail("mnt");
        if (fchdir(root) < 0 || chroot(".") < 0)
            fail("the container's root");
    }

    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0)
        fail("pipe");
    pid_t child = fork(); /* in the container's pid namespace, if one was joined */
    if (child < 0)
        fail("fork");
    if (child == 0) {
        close(report[0]);
        become(report[1]);
    }
    close(report[1]);
    int message[2];
    ssize_t n = read(report[0], message, sizeof message);
    if (n == (ssize_t)sizeof message) {
        waitpid(child, NULL, 0);
        errno = message[1];
        dprintf(log_fd, "nsexec: %s %s: %s\n", steps[message[0] < 6 ? message[0] : 5],
                message[0] >= 4 ? args[0] : "", strerror(errno));
        return 1;
    }
    if (dprintf(pid_out, "%d\n", child) < 0 || close(pid_out) < 0) {
        kill(child, SIGKILL);
        fail(pidfile);
    }
    return 0;
}
