/* Accepts and closes connections on 127.0.0.1:PORT until killed (the connect benchmark's peer). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET; a.sin_addr.s_addr = htonl(INADDR_LOOPBACK); a.sin_port = htons(atoi(argv[1]));
  if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) { perror("listener"); return 1; }
  printf("ready\n"); fflush(stdout);
  for (;;) { int c = accept(s, 0, 0); if (c >= 0) close(c); }
}
