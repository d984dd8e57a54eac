/* shmc_handle: calls from other threads while the main thread is in
 * shmc_run (issue 12 item 7: they got SHMC_RESULT_BUSY), a handle used
 * from the thread that drives its worker (IN_HANDLER), after the worker is
 * freed (WORKER_CLOSED), and its enum argument check. Then
 * shmc_worker_accept: connections, a timeout, TCP and unix listeners, and
 * the wait ending with STOPPING when the worker is told to stop. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "check.h"

#define T 10000 /* ms */
#define CALLERS 4

static shmc_worker *w0, *w1;
static shmc_handle *h0;
static atomic_int stop_w1, callers_done, notes;
static int nested_result = -1;

static void on_echo(void *userdata, const shmc_message *m, shmc_response *r) {
    char buf[64];
    int slot = *(int *)userdata;
    int n = snprintf(buf, sizeof buf, "%d:%.*s", slot, (int)m->len, (const char *)m->data);
    OK(shmc_response_set(r, (const uint8_t *)buf, (size_t)n));
}

static void on_note(void *userdata, const shmc_message *m, shmc_response *r) {
    (void)userdata;
    (void)m;
    (void)r;
    atomic_fetch_add(&notes, 1);
}

/* Runs on w0's driving thread: the handle would wait for itself. */
static void on_nested(void *userdata, const shmc_message *m, shmc_response *r) {
    (void)userdata;
    (void)m;
    (void)r;
    shmc_bytes *reply = NULL;
    nested_result = (int)shmc_handle_request(h0, 1, "echo", NULL, 0, 1000, &reply);
}

static void *serve_w1(void *arg) {
    (void)arg;
    while (!atomic_load(&stop_w1)) OK(shmc_poll(w1, 5, NULL));
    return NULL;
}

static void *caller(void *arg) {
    int i = (int)(intptr_t)arg;
    char data[16];
    int n = snprintf(data, sizeof data, "c%d", i);
    char want[32];

    shmc_bytes *reply = NULL;
    OK(shmc_handle_request(h0, 1, "echo", (const uint8_t *)data, (size_t)n, T, &reply));
    snprintf(want, sizeof want, "1:%s", data);
    CHECK(shmc_bytes_len(reply) == strlen(want) && memcmp(shmc_bytes_data(reply), want, strlen(want)) == 0);
    shmc_bytes_free(reply);

    /* To w0 itself: its own thread (in shmc_run) runs the handler. */
    OK(shmc_handle_request(h0, 0, "echo", (const uint8_t *)data, (size_t)n, T, &reply));
    snprintf(want, sizeof want, "0:%s", data);
    CHECK(shmc_bytes_len(reply) == strlen(want) && memcmp(shmc_bytes_data(reply), want, strlen(want)) == 0);
    shmc_bytes_free(reply);

    /* Other hosts, without a bridge: unreachable, through the handle too;
     * a handle's emit_at is queued (the worker's thread drops it). */
    EXPECT(shmc_handle_request_at(h0, "b", 1, "echo", NULL, 0, T, &reply), SHMC_RESULT_HOST_UNREACHABLE);
    EXPECT(shmc_handle_request_at(h0, NULL, 1, "echo", NULL, 0, T, &reply), SHMC_RESULT_NULL_ARGUMENT);
    OK(shmc_handle_emit_at(h0, "b", 1, "echo", (const uint8_t *)data, (size_t)n));

    shmc_map_result *map = NULL;
    OK(shmc_handle_map(h0, "echo", (const uint8_t *)data, (size_t)n, T, &map));
    CHECK(shmc_map_result_len(map) == 2);
    for (size_t k = 0; k < 2; k++) {
        shmc_map_entry e;
        OK(shmc_map_result_get(map, k, &e));
        CHECK(e.status == SHMC_RESULT_OK);
        snprintf(want, sizeof want, "%u:%s", (unsigned)e.slot, data);
        CHECK(e.len == strlen(want) && memcmp(e.data, want, e.len) == 0);
    }
    shmc_map_result_free(map);

    shmc_consumed c;
    OK(shmc_handle_consume(h0, "echo", NULL, 0, T, &c));
    CHECK(c.slot < 2 && c.delivery_id != 0);

    /* Enum arguments are checked here too. */
    EXPECT(shmc_handle_emit(h0, 3, 1, "note", NULL, 0), SHMC_RESULT_INVALID_ARGUMENT);
    EXPECT(shmc_handle_emit(h0, 0xFFFFFFFFu, 1, "note", NULL, 0), SHMC_RESULT_INVALID_ARGUMENT);
    EXPECT(shmc_handle_emit(h0, SHMC_TARGET_KIND_WORKER, 7, "note", NULL, 0), SHMC_RESULT_NO_SUCH_WORKER);
    OK(shmc_handle_emit(h0, SHMC_TARGET_KIND_WORKER, 1, "note", NULL, 0));

    if (atomic_fetch_add(&callers_done, 1) + 1 == CALLERS) {
        /* The last one: a call into w0 from w1's side runs on_nested on
         * w0's thread, then w0 is told to stop. */
        OK(shmc_handle_request(h0, 0, "nested", NULL, 0, T, &reply));
        shmc_bytes_free(reply);
        OK(shmc_request_shutdown(w0));
    }
    return NULL;
}

/* A handle call made while the driving thread is parked in one long
 * shmc_poll must wake it: the poll returns and runs the call, well within
 * the call's own timeout (without the wake-up the call would wait for the
 * 20 s poll and end TIMED_OUT after 2 s + 1 s). */
static shmc_result woken_result = SHMC_RESULT_UNKNOWN;
static void *call_while_parked(void *arg) {
    (void)arg;
    usleep(100 * 1000); /* the main thread is parked by now */
    shmc_bytes *reply = NULL;
    woken_result = shmc_handle_request(h0, 1, "echo", (const uint8_t *)"w", 1, 2000, &reply);
    shmc_bytes_free(reply);
    return NULL;
}

static void test_wake_parked_poll(void) {
    pthread_t t;
    atomic_store(&stop_w1, 0);
    pthread_t server;
    CHECK(pthread_create(&server, NULL, serve_w1, NULL) == 0);
    CHECK(pthread_create(&t, NULL, call_while_parked, NULL) == 0);
    size_t handled = 0;
    OK(shmc_poll(w0, 20000, &handled));
    CHECK(handled >= 1); /* the wake-up */
    CHECK(pthread_join(t, NULL) == 0);
    EXPECT(woken_result, SHMC_RESULT_OK);
    atomic_store(&stop_w1, 1);
    CHECK(pthread_join(server, NULL) == 0);
}

static int listen_tcp(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK(bind(fd, (struct sockaddr *)&a, sizeof a) == 0);
    CHECK(listen(fd, 16) == 0);
    socklen_t len = sizeof a;
    CHECK(getsockname(fd, (struct sockaddr *)&a, &len) == 0);
    *port = ntohs(a.sin_port);
    return fd;
}

static int connect_tcp(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK(connect(fd, (struct sockaddr *)&a, sizeof a) == 0);
    return fd;
}

struct accept_wait {
    int listener;
    shmc_result result;
};

static void *accept_forever(void *arg) {
    struct accept_wait *a = arg;
    int fd = -1;
    a->result = shmc_worker_accept(w1, a->listener, SHMC_WAIT_FOREVER, &fd);
    return NULL;
}

static void test_accept(void) {
    int port = 0;
    int l = listen_tcp(&port);
    int fd = -1;
    EXPECT(shmc_worker_accept(w1, l, 50, &fd), SHMC_RESULT_TIMED_OUT);
    CHECK(fd == -1);
    int client = connect_tcp(port);
    OK(shmc_worker_accept(w1, l, T, &fd));
    CHECK(fd >= 0);
    CHECK(write(client, "ping", 4) == 4);
    char buf[4];
    CHECK(read(fd, buf, 4) == 4 && memcmp(buf, "ping", 4) == 0);
    close(fd);
    close(client);

    /* A unix listener. */
    char path[64];
    snprintf(path, sizeof path, "/tmp/shmc-accept-%d.sock", (int)getpid());
    unlink(path);
    int u = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un ua = {.sun_family = AF_UNIX};
    strncpy(ua.sun_path, path, sizeof ua.sun_path - 1);
    CHECK(bind(u, (struct sockaddr *)&ua, sizeof ua) == 0 && listen(u, 4) == 0);
    int uc = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(connect(uc, (struct sockaddr *)&ua, sizeof ua) == 0);
    fd = -1;
    OK(shmc_worker_accept(w1, u, T, &fd));
    CHECK(fd >= 0);
    close(fd);
    close(uc);
    close(u);
    unlink(path);

    /* Not a listener: a typed error, not a crash. */
    int p[2];
    CHECK(pipe(p) == 0);
    EXPECT(shmc_worker_accept(w1, p[0], 50, &fd), SHMC_RESULT_IO);
    close(p[0]);
    close(p[1]);
    EXPECT(shmc_worker_accept(w1, -1, 50, &fd), SHMC_RESULT_INVALID_ARGUMENT);
    EXPECT(shmc_worker_accept(w1, l, 50, NULL), SHMC_RESULT_NULL_ARGUMENT);

    /* A thread waiting without limit is released by the stop request
     * (without a master, shmc_request_shutdown is the worker's stop). */
    struct accept_wait a = {.listener = l, .result = SHMC_RESULT_OK};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, accept_forever, &a) == 0);
    usleep(100 * 1000);
    OK(shmc_request_shutdown(w1));
    CHECK(pthread_join(t, NULL) == 0);
    EXPECT(a.result, SHMC_RESULT_STOPPING);
    close(l);
}

int main(void) {
    static int slot0 = 0, slot1 = 1;
    shmc_segment *seg = NULL;
    OK(shmc_segment_create(2, &seg));
    OK(shmc_worker_attach(seg, 0, &w0));
    OK(shmc_worker_attach(seg, 1, &w1));
    OK(shmc_on(w0, "echo", on_echo, &slot0, NULL));
    OK(shmc_on(w1, "echo", on_echo, &slot1, NULL));
    OK(shmc_on(w1, "note", on_note, NULL, NULL));
    OK(shmc_on(w0, "nested", on_nested, NULL, NULL));
    OK(shmc_worker_handle(w0, &h0));

    pthread_t server, callers[CALLERS];
    CHECK(pthread_create(&server, NULL, serve_w1, NULL) == 0);
    for (int i = 0; i < CALLERS; i++) CHECK(pthread_create(&callers[i], NULL, caller, (void *)(intptr_t)i) == 0);
    OK(shmc_run(w0)); /* until the last caller asks it to stop */
    for (int i = 0; i < CALLERS; i++) CHECK(pthread_join(callers[i], NULL) == 0);
    EXPECT(nested_result, SHMC_RESULT_IN_HANDLER);
    /* The fire-and-forget emits arrive (w0's loop sent them). */
    for (int i = 0; i < 200 && atomic_load(&notes) < CALLERS; i++) usleep(10 * 1000);
    CHECK(atomic_load(&notes) == CALLERS);
    atomic_store(&stop_w1, 1);
    CHECK(pthread_join(server, NULL) == 0);

    test_wake_parked_poll();

    /* Under max_message (16 MiB) but over the payload limit (max_message
     * less the longest call header): refused at once, not sent and lost
     * later on the worker's thread. */
    size_t big = 16u * 1024 * 1024 - 100;
    uint8_t *payload = calloc(big, 1);
    CHECK(payload != NULL);
    EXPECT(shmc_handle_emit(h0, SHMC_TARGET_KIND_WORKER, 1, "note", payload, big), SHMC_RESULT_TOO_LARGE);
    free(payload);

    test_accept();

    OK(shmc_worker_free(w0));
    shmc_bytes *reply = NULL;
    EXPECT(shmc_handle_request(h0, 1, "echo", NULL, 0, 100, &reply), SHMC_RESULT_WORKER_CLOSED);
    EXPECT(shmc_handle_emit(h0, SHMC_TARGET_KIND_ALL, 0, "note", NULL, 0), SHMC_RESULT_WORKER_CLOSED);
    shmc_handle_free(h0);
    OK(shmc_worker_free(w1));
    shmc_segment_free(seg);
    return 0;
}
