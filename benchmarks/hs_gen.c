/*
 * hs_gen.c: the compiled handshake and storm load generator of relay_bench.py.
 *
 * Why it exists: a Python load generator (picows on uvloop) tops out below what a direct
 * connection to the backends can take, so the handshake cells measured the client, not the
 * proxy. This one does the TCP connect, the TLS handshake (OpenSSL) and the WebSocket Upgrade
 * in C, for many connections at once on one epoll loop, so direct is the fastest target.
 *
 * Two modes, both bounded in count and time, each printing one JSON line on stdout:
 *
 *   hs     --conns N sessions in flight, closed loop, for --warmup + --duration seconds. Each
 *          session: connect; TLS handshake (--tls; full, or --resume with the SSL_SESSION saved
 *          from an earlier handshake on the same port); the HTTP/1.1 Upgrade with a fixed key;
 *          the 101 checked (status and Sec-WebSocket-Accept); a masked close frame; the close
 *          read back; the socket closed; the next session. Counts sessions completed in the
 *          window, handshake latency (connect start to 101) p50/p99, errors by kind.
 *   storm  --conns N sessions opened all at once at --start-at (wall clock, so that several
 *          processes start together), each: handshake, one masked --size byte message echoed,
 *          close. Reports when each was established (offset from the start), latency p50/p99,
 *          how many were established and completed within --max-seconds, failures by kind.
 *
 * Error kinds: refused, reset, timeout, non101 (status or Sec-WebSocket-Accept wrong), eof
 * (closed early), tls, local (no ephemeral port, no descriptor), other.
 *
 * Loopback only: --host must be in 127.0.0.0/8.
 *
 *   gcc -O2 -o hs_gen hs_gen.c -lssl -lcrypto
 *   ./hs_gen --mode hs --port 9001 --port 9002 --conns 50 --warmup 1 --duration 4
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 16
#define MAX_CONNS 20000
#define MAX_SAMPLES 2000000 /* latency samples kept (a bound far above a cell's count) */
#define IN_CAP 8192         /* a response head and a small frame fit; larger heads are non101 */
#define MAX_MSG 4096
#define RETRY_NS 10000000LL /* a failed slot waits 10 ms before its next session (hs mode) */

static const char KEY[] = "dGhlIHNhbXBsZSBub25jZQ==";
static const char ACCEPT[] = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="; /* RFC 6455's example pair */

enum state { S_IDLE, S_CONNECT, S_TLS, S_SEND_REQ, S_READ_RESP, S_SEND_MSG, S_READ_ECHO,
             S_SEND_CLOSE, S_READ_CLOSE, S_DONE };
enum kind { K_REFUSED, K_RESET, K_TIMEOUT, K_NON101, K_EOF, K_TLS, K_LOCAL, K_OTHER, K_COUNT };
static const char *KIND_NAMES[K_COUNT] = {"refused", "reset", "timeout", "non101", "eof", "tls", "local", "other"};

struct conn {
    int fd;
    int port_idx;
    uint32_t gen;        /* bumped per session: an epoll event of an earlier session is ignored */
    enum state state;
    uint32_t events;     /* epoll interest now registered (0: not registered) */
    SSL *ssl;
    int64_t started;     /* connect start */
    int64_t deadline;    /* the session fails with "timeout" past this */
    int64_t established; /* the 101 arrived (0: not yet) */
    int64_t retry_at;    /* S_IDLE: start the next session at this time (hs mode) */
    const char *out;
    size_t out_len, out_off;
    unsigned char in[IN_CAP];
    size_t in_len;
};

static struct {
    int storm;
    int tls, resume;
    int conns;
    double warmup, duration, max_seconds, timeout, start_at;
    int size;
    struct sockaddr_in addrs[MAX_PORTS];
    int nports;
    const char *ca;
} opt = {.conns = 50, .warmup = 1.0, .duration = 4.0, .max_seconds = 60.0, .timeout = 10.0, .size = 16};

static SSL_CTX *ctx;
static SSL_SESSION *saved[MAX_PORTS];
static char requests[MAX_PORTS][256];
static size_t request_lens[MAX_PORTS];
static unsigned char close_frame[8];
static unsigned char msg_frame[MAX_MSG + 8];
static size_t msg_frame_len;
static int ep;
static struct conn *conns;
static int64_t *samples;
static long nsamples;
static long errors[K_COUNT];
static long completed, established_n, resumed_n, full_n, next_port;
static long finished_n; /* storm: sessions that ended (completed or failed) */
static int64_t window_start, window_end, last_established;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *msg) {
    fprintf(stderr, "hs_gen: %s\n", msg);
    exit(2);
}

static enum kind errno_kind(int e) {
    switch (e) {
    case ECONNREFUSED: return K_REFUSED;
    case ECONNRESET: case EPIPE: case ECONNABORTED: return K_RESET;
    case ETIMEDOUT: return K_TIMEOUT;
    case EADDRNOTAVAIL: case EMFILE: case ENFILE: case ENOBUFS: case ENOMEM: return K_LOCAL;
    default: return K_OTHER;
    }
}

static void set_interest(struct conn *c, uint32_t ev) {
    if (c->events == ev) return;
    struct epoll_event e = {.events = ev, .data.u64 = ((uint64_t)c->gen << 32) | (uint64_t)(c - conns)};
    if (epoll_ctl(ep, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &e) < 0) die("epoll_ctl failed");
    c->events = ev;
}

static void release(struct conn *c) {
    if (c->ssl) {
        SSL_shutdown(c->ssl); /* quiet shutdown: nothing is sent, the session stays resumable */
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) close(c->fd); /* closing also drops it from the epoll set */
    c->fd = -1;
    c->events = 0;
}

static void start_session(struct conn *c, int64_t now);

static void finish(struct conn *c, int64_t now, int failed) {
    release(c);
    c->state = failed ? S_IDLE : S_DONE;
    if (opt.storm) {
        c->state = S_DONE;
        finished_n++;
        return;
    }
    if (failed) {
        c->retry_at = now + RETRY_NS;
        return;
    }
    if (now < window_end) start_session(c, now);
}

static void fail(struct conn *c, enum kind k, int64_t now) {
    errors[k]++;
    finish(c, now, 1);
}

static void start_session(struct conn *c, int64_t now) {
    c->port_idx = (int)(next_port++ % opt.nports);
    c->gen++;
    c->started = now;
    c->deadline = now + (int64_t)(opt.timeout * 1e9);
    c->established = 0;
    c->in_len = 0;
    c->events = 0;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        fail(c, errno_kind(errno), now);
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = S_CONNECT;
    if (connect(c->fd, (struct sockaddr *)&opt.addrs[c->port_idx], sizeof opt.addrs[0]) < 0 && errno != EINPROGRESS) {
        fail(c, errno_kind(errno), now);
        return;
    }
    set_interest(c, EPOLLOUT);
}

/* 1: all sent, 0: would block (interest set), -1: failed (kind in *k) */
static int do_write(struct conn *c, enum kind *k) {
    while (c->out_off < c->out_len) {
        if (c->ssl) {
            int r = SSL_write(c->ssl, c->out + c->out_off, (int)(c->out_len - c->out_off));
            if (r > 0) {
                c->out_off += (size_t)r;
                continue;
            }
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_WRITE) { set_interest(c, EPOLLOUT); return 0; }
            if (e == SSL_ERROR_WANT_READ) { set_interest(c, EPOLLIN); return 0; }
            *k = e == SSL_ERROR_SYSCALL ? K_RESET : K_TLS;
            return -1;
        }
        ssize_t r = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (r >= 0) {
            c->out_off += (size_t)r;
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) { set_interest(c, EPOLLOUT); return 0; }
        if (errno == EINTR) continue;
        *k = errno_kind(errno);
        return -1;
    }
    return 1;
}

/* >0: bytes added to c->in, 0: would block (interest set), -1: failed or EOF (kind in *k) */
static int do_read(struct conn *c, enum kind *k) {
    size_t room = IN_CAP - c->in_len;
    if (room == 0) { *k = K_NON101; return -1; }
    if (c->ssl) {
        int r = SSL_read(c->ssl, c->in + c->in_len, (int)room);
        if (r > 0) { c->in_len += (size_t)r; return r; }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ) { set_interest(c, EPOLLIN); return 0; }
        if (e == SSL_ERROR_WANT_WRITE) { set_interest(c, EPOLLOUT); return 0; }
        *k = e == SSL_ERROR_ZERO_RETURN ? K_EOF : e == SSL_ERROR_SYSCALL ? (errno ? errno_kind(errno) : K_EOF) : K_TLS;
        return -1;
    }
    for (;;) {
        ssize_t r = recv(c->fd, c->in + c->in_len, room, 0);
        if (r > 0) { c->in_len += (size_t)r; return (int)r; }
        if (r == 0) { *k = K_EOF; return -1; }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) { set_interest(c, EPOLLIN); return 0; }
        *k = errno_kind(errno);
        return -1;
    }
}

static void consume(struct conn *c, size_t n) {
    memmove(c->in, c->in + n, c->in_len - n);
    c->in_len -= n;
}

/* The response head: 1 complete and valid, 0 incomplete, -1 not a valid 101. */
static int parse_head(struct conn *c) {
    unsigned char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
    if (end == NULL) return 0;
    size_t head_len = (size_t)(end - c->in) + 4;
    if (head_len < 12 || memcmp(c->in, "HTTP/1.1 101", 12) != 0) return -1;
    int accept_ok = 0;
    const char *p = (const char *)c->in, *stop = (const char *)c->in + head_len;
    const char name[] = "sec-websocket-accept:";
    while (p < stop) {
        const char *eol = memmem(p, (size_t)(stop - p), "\r\n", 2);
        if (eol == NULL) break;
        size_t len = (size_t)(eol - p);
        if (len > sizeof name - 1 && strncasecmp(p, name, sizeof name - 1) == 0) {
            const char *v = p + sizeof name - 1;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            const char *ve = eol;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            accept_ok = (size_t)(ve - v) == sizeof ACCEPT - 1 && memcmp(v, ACCEPT, sizeof ACCEPT - 1) == 0;
        }
        p = eol + 2;
    }
    if (!accept_ok) return -1;
    consume(c, head_len);
    return 1;
}

/* One server frame at the front of c->in: its opcode (and payload length), or -1 if incomplete. */
static int parse_frame(struct conn *c, uint64_t *payload_len) {
    if (c->in_len < 2) return -1;
    unsigned char *b = c->in;
    uint64_t len = b[1] & 0x7f;
    size_t hdr = 2;
    if (len == 126) {
        if (c->in_len < 4) return -1;
        len = ((uint64_t)b[2] << 8) | b[3];
        hdr = 4;
    } else if (len == 127) {
        if (c->in_len < 10) return -1;
        len = 0;
        for (int i = 0; i < 8; i++) len = (len << 8) | b[2 + i];
        hdr = 10;
    }
    if (b[1] & 0x80) hdr += 4;
    if (len > IN_CAP || c->in_len < hdr + len) return -1;
    *payload_len = len;
    int opcode = b[0] & 0x0f;
    consume(c, hdr + (size_t)len);
    return opcode;
}

static void established(struct conn *c, int64_t now) {
    c->established = now;
    if (opt.storm) {
        if (now > last_established) last_established = now;
        established_n++;
    }
    if ((opt.storm || (now >= window_start && now < window_end)) && nsamples < MAX_SAMPLES)
        samples[nsamples++] = now - c->started;
    if (c->ssl) {
        if (SSL_session_reused(c->ssl)) {
            resumed_n++;
        } else {
            full_n++;
            if (opt.resume) {
                SSL_SESSION *s = SSL_get1_session(c->ssl);
                if (s && SSL_SESSION_is_resumable(s)) {
                    if (saved[c->port_idx]) SSL_SESSION_free(saved[c->port_idx]);
                    saved[c->port_idx] = s;
                } else if (s) {
                    SSL_SESSION_free(s);
                }
            }
        }
    }
}

static void step(struct conn *c, int64_t now) {
    enum kind k = K_OTHER;
    for (;;) {
        int r;
        uint64_t plen;
        switch (c->state) {
        case S_CONNECT: {
            int err = 0;
            socklen_t len = sizeof err;
            if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
            if (err == EINPROGRESS || err == EALREADY) return;
            if (err) { fail(c, errno_kind(err), now); return; }
            if (opt.tls) {
                c->ssl = SSL_new(ctx);
                if (c->ssl == NULL || !SSL_set_fd(c->ssl, c->fd)) { fail(c, K_TLS, now); return; }
                if (opt.resume && saved[c->port_idx]) SSL_set_session(c->ssl, saved[c->port_idx]);
                c->state = S_TLS;
            } else {
                c->state = S_SEND_REQ;
            }
            c->out = requests[c->port_idx];
            c->out_len = request_lens[c->port_idx];
            c->out_off = 0;
            break;
        }
        case S_TLS:
            errno = 0;
            r = SSL_connect(c->ssl);
            if (r == 1) { c->state = S_SEND_REQ; break; }
            switch (SSL_get_error(c->ssl, r)) {
            case SSL_ERROR_WANT_READ: set_interest(c, EPOLLIN); return;
            case SSL_ERROR_WANT_WRITE: set_interest(c, EPOLLOUT); return;
            case SSL_ERROR_SYSCALL: ERR_clear_error(); fail(c, errno ? errno_kind(errno) : K_EOF, now); return;
            default: ERR_clear_error(); fail(c, K_TLS, now); return;
            }
        case S_SEND_REQ: case S_SEND_MSG: case S_SEND_CLOSE:
            r = do_write(c, &k);
            if (r < 0) { ERR_clear_error(); fail(c, k, now); return; }
            if (r == 0) return;
            c->state = c->state == S_SEND_REQ ? S_READ_RESP : c->state == S_SEND_MSG ? S_READ_ECHO : S_READ_CLOSE;
            break;
        case S_READ_RESP:
            r = parse_head(c);
            if (r < 0) { fail(c, K_NON101, now); return; }
            if (r > 0) {
                established(c, now);
                c->out_off = 0;
                if (opt.storm) {
                    c->out = (const char *)msg_frame;
                    c->out_len = msg_frame_len;
                    c->state = S_SEND_MSG;
                } else {
                    c->out = (const char *)close_frame;
                    c->out_len = sizeof close_frame;
                    c->state = S_SEND_CLOSE;
                }
                break;
            }
            r = do_read(c, &k);
            if (r < 0) { ERR_clear_error(); fail(c, k, now); return; }
            if (r == 0) return;
            break;
        case S_READ_ECHO: case S_READ_CLOSE:
            r = parse_frame(c, &plen);
            if (r == 8 && c->state == S_READ_CLOSE) {
                if (opt.storm || (now >= window_start && now < window_end)) completed++;
                finish(c, now, 0);
                return;
            }
            if (r == 8) { fail(c, K_EOF, now); return; } /* closed before the echo */
            if (r >= 0 && c->state == S_READ_ECHO && (r == 1 || r == 2)) {
                if (plen != (uint64_t)opt.size) { fail(c, K_OTHER, now); return; }
                c->out = (const char *)close_frame;
                c->out_len = sizeof close_frame;
                c->out_off = 0;
                c->state = S_SEND_CLOSE;
                break;
            }
            if (r >= 0) break; /* pings, pongs and other frames are skipped */
            r = do_read(c, &k);
            if (r < 0) { ERR_clear_error(); fail(c, k, now); return; }
            if (r == 0) return;
            break;
        case S_IDLE: case S_DONE:
            return;
        }
    }
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_us(int64_t *v, long n, double p) {
    if (n == 0) return -1;
    long i = (long)(p * (double)n);
    if (i >= n) i = n - 1;
    return (double)v[i] / 1000.0;
}

static void print_number(const char *key, double v) {
    if (v < 0) printf("\"%s\": null", key);
    else printf("\"%s\": %.1f", key, v);
}

static void build_frames(void) {
    unsigned char m[4] = {0x37, 0xfa, 0x21, 0x3d};
    unsigned char code[2] = {0x03, 0xe8}; /* 1000 */
    close_frame[0] = 0x88;
    close_frame[1] = 0x80 | 2;
    memcpy(close_frame + 2, m, 4);
    for (int i = 0; i < 2; i++) close_frame[6 + i] = code[i] ^ m[i];
    size_t h = 0;
    msg_frame[h++] = 0x82;
    if (opt.size < 126) {
        msg_frame[h++] = (unsigned char)(0x80 | opt.size);
    } else {
        msg_frame[h++] = 0x80 | 126;
        msg_frame[h++] = (unsigned char)(opt.size >> 8);
        msg_frame[h++] = (unsigned char)(opt.size & 0xff);
    }
    memcpy(msg_frame + h, m, 4);
    h += 4;
    for (int i = 0; i < opt.size; i++) msg_frame[h + (size_t)i] = (unsigned char)((i & 0xff) ^ m[i & 3]);
    msg_frame_len = h + (size_t)opt.size;
}

static void usage(void) {
    die("usage: hs_gen --mode hs|storm --port P [--port P ...] [--host 127.0.0.1] [--tls] [--resume] [--ca FILE]\n"
        "              [--conns N] [--warmup S] [--duration S] [--timeout S] [--max-seconds S] [--start-at EPOCH]\n"
        "              [--size BYTES]");
}

static void parse_args(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int ports[MAX_PORTS], np = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--tls")) { opt.tls = 1; continue; }
        if (!strcmp(a, "--resume")) { opt.resume = 1; continue; }
        if (v == NULL) usage();
        i++;
        if (!strcmp(a, "--mode")) {
            if (!strcmp(v, "storm")) opt.storm = 1;
            else if (strcmp(v, "hs")) usage();
        } else if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) {
            if (np == MAX_PORTS) die("too many --port");
            ports[np++] = atoi(v);
        } else if (!strcmp(a, "--ca")) opt.ca = v;
        else if (!strcmp(a, "--conns")) opt.conns = atoi(v);
        else if (!strcmp(a, "--warmup")) opt.warmup = atof(v);
        else if (!strcmp(a, "--duration")) opt.duration = atof(v);
        else if (!strcmp(a, "--timeout")) opt.timeout = atof(v);
        else if (!strcmp(a, "--max-seconds")) opt.max_seconds = atof(v);
        else if (!strcmp(a, "--start-at")) opt.start_at = atof(v);
        else if (!strcmp(a, "--size")) opt.size = atoi(v);
        else usage();
    }
    if (np == 0 || opt.conns < 1 || opt.conns > MAX_CONNS) usage();
    if (opt.size < 1 || opt.size > MAX_MSG) die("--size must be 1..4096");
    if (opt.max_seconds <= 0 || opt.max_seconds > 3600) die("--max-seconds must be in (0, 3600]");
    struct in_addr ia;
    if (inet_pton(AF_INET, host, &ia) != 1 || (ntohl(ia.s_addr) >> 24) != 127) die("--host must be a 127.x.x.x address");
    for (int i = 0; i < np; i++) {
        opt.addrs[i].sin_family = AF_INET;
        opt.addrs[i].sin_addr = ia;
        opt.addrs[i].sin_port = htons((uint16_t)ports[i]);
        request_lens[i] = (size_t)snprintf(
            requests[i], sizeof requests[i],
            "GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
            host, ports[i], KEY);
    }
    opt.nports = np;
}

static void setup_tls(void) {
    ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) die("SSL_CTX_new failed");
    if (opt.ca) {
        if (SSL_CTX_load_verify_locations(ctx, opt.ca, NULL) != 1) die("cannot load --ca");
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    }
    SSL_CTX_set_quiet_shutdown(ctx, 1);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF); /* sessions are kept here, per port */
}

static void wait_until_start(void) {
    if (opt.start_at <= 0) return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double wait = opt.start_at - ((double)ts.tv_sec + ts.tv_nsec / 1e9);
    if (wait > 10) die("--start-at is more than 10 s away");
    if (wait > 0) {
        struct timespec w = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
        nanosleep(&w, NULL);
    }
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    if (opt.tls) setup_tls();
    build_frames();
    conns = calloc((size_t)opt.conns, sizeof *conns);
    samples = malloc(sizeof *samples * (opt.storm ? (size_t)opt.conns : MAX_SAMPLES));
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (!conns || !samples || ep < 0) die("out of memory or descriptors");
    for (int i = 0; i < opt.conns; i++) conns[i].fd = -1;

    wait_until_start();
    int64_t t0 = now_ns();
    int64_t hard_end = t0 + (int64_t)(opt.max_seconds * 1e9);
    if (opt.storm) {
        window_start = t0;
        window_end = hard_end;
    } else {
        window_start = t0 + (int64_t)(opt.warmup * 1e9);
        window_end = window_start + (int64_t)(opt.duration * 1e9);
        if (window_end > hard_end) window_end = hard_end;
    }
    for (int i = 0; i < opt.conns; i++) start_session(&conns[i], t0);

    struct epoll_event evs[1024];
    int64_t next_scan = t0;
    for (;;) {
        int64_t now = now_ns();
        if (now >= window_end) break;
        if (opt.storm && finished_n == opt.conns) break;
        int n = epoll_wait(ep, evs, 1024, 20);
        now = now_ns();
        for (int i = 0; i < n; i++) {
            struct conn *c = &conns[evs[i].data.u64 & 0xffffffffu];
            if (c->fd >= 0 && c->gen == (uint32_t)(evs[i].data.u64 >> 32)) step(c, now);
        }
        if (now >= next_scan) { /* deadlines, and the failed slots' next session */
            next_scan = now + 10000000LL;
            for (int i = 0; i < opt.conns; i++) {
                struct conn *c = &conns[i];
                if (c->fd >= 0 && now > c->deadline) fail(c, K_TIMEOUT, now);
                else if (c->state == S_IDLE && c->fd < 0 && !opt.storm && now >= c->retry_at && now < window_end)
                    start_session(c, now);
            }
        }
    }
    int64_t end = now_ns();
    long unfinished_established = 0;
    for (int i = 0; i < opt.conns; i++) {
        struct conn *c = &conns[i];
        if (c->fd >= 0) {
            if (opt.storm) {
                if (c->established) unfinished_established++;
                errors[K_TIMEOUT]++;
            }
            release(c);
        }
    }
    qsort(samples, (size_t)nsamples, sizeof *samples, cmp64);
    long errs = 0;
    for (int k = 0; k < K_COUNT; k++) errs += errors[k];
    printf("{\"mode\": \"%s\", \"conns\": %d, ", opt.storm ? "storm" : "hs", opt.conns);
    if (opt.storm) {
        double span = (double)(end - t0) / 1e9;
        printf("\"established\": %ld, \"completed\": %ld, \"established_not_completed\": %ld, ", established_n,
               completed, unfinished_established);
        printf("\"last_established_s\": %.4f, \"seconds\": %.3f, ", established_n ? (double)(last_established - t0) / 1e9 : 0.0,
               span);
    } else {
        double secs = (double)(window_end - window_start) / 1e9;
        printf("\"handshakes\": %ld, \"seconds\": %.3f, \"rate\": %.1f, ", completed, secs, (double)completed / secs);
    }
    print_number("p50_us", pct_us(samples, nsamples, 0.5));
    printf(", ");
    print_number("p99_us", pct_us(samples, nsamples, 0.99));
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf(", \"cpu_s\": %.3f", (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                                   (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
    printf(", \"tls_full\": %ld, \"tls_resumed\": %ld, \"errors\": %ld, \"error_kinds\": {", full_n, resumed_n, errs);
    int first = 1;
    for (int k = 0; k < K_COUNT; k++) {
        if (!errors[k]) continue;
        printf("%s\"%s\": %ld", first ? "" : ", ", KIND_NAMES[k], errors[k]);
        first = 0;
    }
    printf("}");
    if (opt.storm) { /* every session's latency to its 101, so several processes' figures merge exactly */
        printf(", \"latencies_us\": [");
        for (long i = 0; i < nsamples; i++) printf("%s%lld", i ? ", " : "", (long long)(samples[i] / 1000));
        printf("]");
    }
    printf("}\n");
    return 0;
}
