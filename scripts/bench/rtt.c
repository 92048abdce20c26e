/* Benchmark floor: the round trip of a 128-byte message between two processes over a
 * SOCK_SEQPACKET socketpair, the child waiting in poll() as the daemon waits in epoll.
 * Prints the median round trip in microseconds over N exchanges, 1 ms apart (the
 * daemon is idle between a short process's asks).
 *   rtt N */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}
static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 200, sv[2];
  char buf[128] = {0};
  if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv)) return 1;
  pid_t pid = fork();
  if (pid == 0) {
    for (int i = 0; i < n; i++) {
      struct pollfd p = {sv[1], POLLIN, 0};
      poll(&p, 1, -1);
      if (recv(sv[1], buf, sizeof buf, 0) <= 0 || send(sv[1], buf, 8, 0) != 8) _exit(1);
    }
    _exit(0);
  }
  double *t = malloc(sizeof(double) * n);
  for (int i = 0; i < n; i++) {
    usleep(1000);
    double t0 = now_us();
    if (send(sv[0], buf, sizeof buf, 0) != sizeof buf || recv(sv[0], buf, sizeof buf, 0) != 8) return 1;
    t[i] = now_us() - t0;
  }
  waitpid(pid, 0, 0);
  qsort(t, n, sizeof(double), cmp);
  printf("%.1f\n", t[n / 2]);
  return 0;
}
