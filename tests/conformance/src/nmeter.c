/*
 * A stand-in for busybox's nmeter applet, which Debian's busybox lacks: the part node
 * conformance uses, `nmeter -d0 '%3t' | head -n1`, for timestamps with milliseconds.
 * Prints its format once per delay (-d MILLISECONDS, default 1000) until its output
 * goes away; in the format, %[N]t is the local time as HH:MM:SS with N decimals (0-6),
 * %% a percent sign, anything else is copied. Other busybox nmeter fields are refused.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int print_line(const char *format)
{
    struct timeval now;
    struct tm tm;
    const char *p;

    gettimeofday(&now, NULL);
    localtime_r(&now.tv_sec, &tm);
    for (p = format; *p; p++) {
        int digits = 0;
        if (*p != '%') {
            putchar(*p);
            continue;
        }
        p++;
        if (*p == '%') {
            putchar('%');
            continue;
        }
        if (*p >= '0' && *p <= '6') {
            digits = *p - '0';
            p++;
        }
        if (*p != 't') {
            fprintf(stderr, "nmeter: only %%[N]t is supported\n");
            return 1;
        }
        printf("%02d:%02d:%02d", tm.tm_hour, tm.tm_min, tm.tm_sec);
        if (digits > 0) {
            long fraction = now.tv_usec;
            for (int i = digits; i < 6; i++)
                fraction /= 10;
            printf(".%0*ld", digits, fraction);
        }
    }
    putchar('\n');
    return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    long delay_ms = 1000;
    int opt;

    while ((opt = getopt(argc, argv, "d:")) != -1) {
        if (opt != 'd')
            return 2;
        delay_ms = strtol(optarg, NULL, 10);
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: nmeter [-d MSEC] FORMAT\n");
        return 2;
    }
    for (;;) {
        if (print_line(argv[optind]) != 0)
            return 1;
        if (delay_ms > 0)
            usleep((useconds_t)delay_ms * 1000);
    }
}
