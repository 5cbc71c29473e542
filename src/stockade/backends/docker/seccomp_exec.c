/* stockade-seccomp-exec FILTER -- COMMAND [ARG...]
 *
 * Loads the classic-BPF seccomp program in FILTER (a `struct sock_filter[]`, as libseccomp exports it), sets
 * no_new_privs, and execs COMMAND (looked up in PATH). Built by the docker backend (`_seccomp_exec.py`) and
 * bound read-only into gVisor containers, where it wraps every exec: Debian's runsc applies the container's
 * OCI seccomp profile to the container's first process and its descendants only, so `docker exec`'d commands
 * would otherwise run unfiltered.
 *
 * It fails closed: if the filter cannot be read or loaded, the command does not run (exit 125). If the
 * command cannot be started, it says why on stderr and exits 127 (not found) or 126 (any other reason), as a
 * shell does. Static, so it needs nothing from the container's image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static struct sock_filter program[BPF_MAXINSNS];

static int refuse(const char *what, int err) {
    fprintf(stderr, "stockade-seccomp-exec: %s: %s; the command was not run\n", what, strerror(err));
    return 125;
}

int main(int argc, char **argv) {
    if (argc < 4 || strcmp(argv[2], "--") != 0) {
        fputs("usage: stockade-seccomp-exec FILTER -- COMMAND [ARG...]\n", stderr);
        return 125;
    }
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return refuse("cannot open the filter", errno);
    size_t size = 0;
    for (;;) {
        char extra;
        /* Read to the end; one byte more than the buffer holds means the program is too long. */
        ssize_t n = size < sizeof program ? read(fd, (char *)program + size, sizeof program - size)
                                          : read(fd, &extra, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return refuse("cannot read the filter", errno);
        if (n == 0)
            break;
        if (size == sizeof program)
            return refuse("the filter is longer than BPF_MAXINSNS instructions", E2BIG);
        size += (size_t)n;
    }
    close(fd);
    if (size == 0 || size % sizeof(struct sock_filter) != 0)
        return refuse("the filter is not a whole number of BPF instructions", EINVAL);
    struct sock_fprog fprog = {.len = (unsigned short)(size / sizeof(struct sock_filter)), .filter = program};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return refuse("cannot set no_new_privs", errno);
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog) != 0)
        return refuse("cannot load the filter", errno);
    execvp(argv[3], argv + 3);
    int err = errno;
    fprintf(stderr, "stockade-seccomp-exec: cannot run %s: %s\n", argv[3], strerror(err));
    return err == ENOENT ? 127 : 126;
}
