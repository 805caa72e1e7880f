/*
 * The CPU floor of a broker that wakes for its input, on this machine.
 *
 * Three processes on loopback, shaped like the fixed-rate scenario: a producer sends 256-byte
 * messages at a fixed rate to the relay, the relay forwards each to a consumer, the consumer
 * answers every message with a 20-byte "ack". The relay is the smallest broker there is: one
 * thread, epoll, a read and a write, no protocol. It reports its own CPU time per message (from
 * getrusage), which is what compare.py measures of a broker, and its wake-ups.
 *
 * With an interval (microseconds), the relay sleeps that long after handling each wake-up before
 * it waits again, so that one wake-up takes in everything that arrived meanwhile (read
 * coalescing, at the cost of up to one interval of latency per message).
 *
 *   relay relay PORT INTERVAL_US    # serves one producer, then one consumer; prints its figures
 *   relay produce PORT RATE SECONDS
 *   relay consume PORT
 *
 * perf/wakeup_floor.py builds and runs it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MESSAGE 256
#define ACK 20

static void die(const char *what) {
    perror(what);
    exit(1);
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in address = {0};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return address;
}

static void no_delay(int fd) {
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) die("TCP_NODELAY");
}

static int connect_to(int port) {
    struct sockaddr_in address = loopback(port);
    for (int attempt = 0; attempt < 2000; attempt++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) die("socket");
        if (connect(fd, (struct sockaddr *)&address, sizeof address) == 0) {
            no_delay(fd);
            return fd;
        }
        close(fd);
        usleep(1000);
    }
    die("connect");
    return -1;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double seconds(struct timeval t) { return t.tv_sec + t.tv_usec * 1e-6; }

static int relay(int port, long interval_us) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = loopback(port);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0) die("bind");
    if (listen(listener, 4) != 0) die("listen");
    int producer = accept(listener, NULL, NULL);
    int consumer = accept(listener, NULL, NULL);
    if (producer < 0 || consumer < 0) die("accept");
    no_delay(producer);
    no_delay(consumer);
    int epoll = epoll_create1(0);
    struct epoll_event event = {.events = EPOLLIN};
    event.data.fd = producer;
    epoll_ctl(epoll, EPOLL_CTL_ADD, producer, &event);
    event.data.fd = consumer;
    epoll_ctl(epoll, EPOLL_CTL_ADD, consumer, &event);

    static char buffer[1 << 16];
    long forwarded = 0, wakeups = 0;
    struct rusage start;
    getrusage(RUSAGE_SELF, &start);
    for (;;) {
        struct epoll_event ready[2];
        int count = epoll_wait(epoll, ready, 2, -1);
        if (count < 0) die("epoll_wait");
        wakeups++;
        for (int i = 0; i < count; i++) {
            ssize_t got = read(ready[i].data.fd, buffer, sizeof buffer);
            if (got <= 0) goto done; /* the producer finished */
            if (ready[i].data.fd == producer) {
                forwarded += got;
                if (write(consumer, buffer, got) != got) die("write");
            }
        }
        if (interval_us > 0) {
            struct timespec pause = {interval_us / 1000000, (interval_us % 1000000) * 1000};
            nanosleep(&pause, NULL);
        }
    }
done:;
    struct rusage end;
    getrusage(RUSAGE_SELF, &end);
    double user = seconds(end.ru_utime) - seconds(start.ru_utime);
    double sys = seconds(end.ru_stime) - seconds(start.ru_stime);
    long messages = forwarded / MESSAGE;
    printf("{\"interval_us\": %ld, \"messages\": %ld, \"wakeups\": %ld, \"user_s\": %.3f, "
           "\"sys_s\": %.3f, \"us_per_message\": %.2f}\n",
           interval_us, messages, wakeups, user, sys,
           messages ? (user + sys) / messages * 1e6 : 0.0);
    return 0;
}

static int produce(int port, double rate, double duration) {
    int fd = connect_to(port);
    char message[MESSAGE];
    memset(message, 'm', sizeof message);
    double start = now();
    for (long sent = 0; now() - start < duration; sent++) {
        if (write(fd, message, sizeof message) != sizeof message) die("producer write");
        double wait = start + (sent + 1) / rate - now();
        if (wait > 0) {
            struct timespec pause = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
            nanosleep(&pause, NULL);
        }
    }
    close(fd);
    return 0;
}

static int consume(int port) {
    int fd = connect_to(port);
    static char buffer[1 << 16];
    char ack[ACK];
    memset(ack, 'a', sizeof ack);
    long received = 0;
    for (;;) {
        ssize_t got = read(fd, buffer, sizeof buffer);
        if (got <= 0) return 0;
        /* One ack per whole message read, as a consumer acking each delivery does. */
        long before = received / MESSAGE;
        received += got;
        for (long m = before; m < received / MESSAGE; m++)
            if (write(fd, ack, sizeof ack) != sizeof ack) return 0;
    }
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "relay") == 0) return relay(atoi(argv[2]), atol(argv[3]));
    if (argc == 5 && strcmp(argv[1], "produce") == 0)
        return produce(atoi(argv[2]), atof(argv[3]), atof(argv[4]));
    if (argc == 3 && strcmp(argv[1], "consume") == 0) return consume(atoi(argv[2]));
    fprintf(stderr, "usage: relay relay PORT INTERVAL_US | produce PORT RATE SECONDS | consume PORT\n");
    return 2;
}
