/* Benchmark fixture: times each socket()+bind()+close() (or connect) separately and
 * prints "p50_us p99_us mean_us" over N iterations.
 *   bindbench bind PORT N        bind 127.0.0.1:PORT (0: the kernel picks)
 *   bindbench connect PORT N     connect to 127.0.0.1:PORT (something must listen) */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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
  if (argc < 4) { fprintf(stderr, "usage: bindbench bind|connect PORT N\n"); return 2; }
  int connect_mode = !strcmp(argv[1], "connect");
  int port = atoi(argv[2]), n = atoi(argv[3]);
  double *t = malloc(sizeof(double) * n), sum = 0;
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET; a.sin_addr.s_addr = htonl(INADDR_LOOPBACK); a.sin_port = htons(port);
  int one = 1;
  for (int i = 0; i < n; i++) {
    double t0 = now_us();
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int rc;
    if (connect_mode) rc = connect(s, (struct sockaddr *)&a, sizeof a);
    else { setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one); rc = bind(s, (struct sockaddr *)&a, sizeof a); }
    if (rc != 0) { perror(connect_mode ? "connect" : "bind"); return 1; }
    /* close with a reset: no TIME_WAIT, so thousands of connects never run short of ports */
    if (connect_mode) { struct linger l = {1, 0}; setsockopt(s, SOL_SOCKET, SO_LINGER, &l, sizeof l); }
    close(s);
    t[i] = now_us() - t0; sum += t[i];
  }
  qsort(t, n, sizeof(double), cmp);
  printf("%.2f %.2f %.2f\n", t[n / 2], t[(int)(n * 0.99)], sum / n);
  return 0;
}
