/* Benchmark fixture: one socket call in a fresh process, for the cold path.
 *   onecall bind PORT       bind 127.0.0.1:PORT and listen
 *   onecall connect PORT    connect to 127.0.0.1:PORT */
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons(atoi(argv[2]));
  a.sin_addr.s_addr = htonl(0x7f000001);
  if (!strcmp(argv[1], "bind")) {
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (void *)&a, sizeof a)) return 1;
    listen(s, 1);
  } else {
    connect(s, (void *)&a, sizeof a);
  }
  return 0;
}
