/* Benchmark fixture: what the library adds to starting programs.
 *   execbench execve PATH N    N execve() of PATH, a program the kernel refuses (no x bit):
 *                              the loop stays in this process, each call pays the library's
 *                              look at the ELF header and the kernel's refusal
 *   execbench execvp NAME N    the same through execvp() (a PATH search)
 *   execbench spawn PATH N     N posix_spawn() + waitpid() of PATH
 * Prints the median and the p90 of one call in microseconds. */
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc < 4) return 2;
  const char *mode = argv[1], *path = argv[2];
  int n = atoi(argv[3]);
  double *t = malloc(sizeof(double) * n);
  char *args[] = {(char *)path, 0};
  for (int i = 0; i < n; i++) {
    double t0 = now_us();
    if (!strcmp(mode, "execve")) {
      execve(path, args, environ);
    } else if (!strcmp(mode, "execvp")) {
      execvp(path, args);
    } else {
      pid_t pid;
      if (posix_spawn(&pid, path, 0, 0, args, environ) != 0) return 1;
      int st;
      waitpid(pid, &st, 0);
    }
    t[i] = now_us() - t0;
  }
  qsort(t, n, sizeof(double), cmp);
  printf("%.3f %.3f\n", t[n / 2], t[n * 9 / 10]);
  return 0;
}
