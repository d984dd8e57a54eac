/* Threads mode: three workers on one segment, one per thread. Emit and
 * broadcast, request/reply (synchronous and late, from another thread),
 * map statuses, consume, and BUSY from a handler calling back in. */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "check.h"

#define T 10000 /* ms */

static shmc_worker *workers[3];
static atomic_int received[3];
static atomic_int stop_servers;

struct served {
    int slot;
};

static void on_note(void *userdata, const shmc_message *m, shmc_response *r) {
    (void)r;
    int slot = *(int *)userdata;
    CHECK(m->kind == SHMC_CALL_KIND_EVENT);
    CHECK(m->len == 5 && memcmp(m->data, "hello", 5) == 0);
    CHECK(m->event_len == 4 && memcmp(m->event, "note", 4) == 0);
    /* Calling back into the worker that runs this handler is refused. */
    EXPECT(shmc_emit(workers[slot], SHMC_TARGET_KIND_WORKER, 0, "x", NULL, 0, NULL), SHMC_RESULT_BUSY);
    atomic_fetch_add(&received[slot], 1);
}

/* echo: answers "echo:" + payload, synchronously (slot 1 only). */
static void on_echo(void *userdata, const shmc_message *m, shmc_response *r) {
    (void)userdata;
    char buf[64];
    CHECK(m->len + 5 <= sizeof buf);
    memcpy(buf, "echo:", 5);
    memcpy(buf + 5, m->data, m->len);
    OK(shmc_response_set(r, (const uint8_t *)buf, m->len + 5));
    EXPECT(shmc_response_fail(r, "nope"), SHMC_RESULT_INVALID_ARGUMENT);
}

/* later: keeps the reply and answers it 50 ms later from another thread. */
static void *answer_later(void *reply) {
    usleep(50 * 1000);
    OK(shmc_reply_send((shmc_reply *)reply, (const uint8_t *)"late", 4));
    return NULL;
}

static void on_later(void *userdata, const shmc_message *m, shmc_reply *reply) {
    (void)userdata;
    CHECK(m->kind == SHMC_CALL_KIND_REQUEST);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, answer_later, reply) == 0);
    pthread_detach(t);
}

static void on_refuse(void *userdata, const shmc_message *m, shmc_reply *reply) {
    (void)userdata;
    (void)m;
    OK(shmc_reply_fail(reply, "refused on purpose"));
}

static void on_drop(void *userdata, const shmc_message *m, shmc_reply *reply) {
    (void)userdata;
    (void)m;
    shmc_reply_free(reply);
}

static atomic_int tasks;
static void on_task(void *userdata, const shmc_message *m, shmc_response *r) {
    (void)userdata;
    (void)r;
    CHECK(m->kind == SHMC_CALL_KIND_CONSUME && m->delivery_id != 0);
    atomic_fetch_add(&tasks, 1);
}

static void *serve(void *arg) {
    shmc_worker *w = arg;
    while (!atomic_load(&stop_servers)) OK(shmc_poll(w, 5, NULL));
    return NULL;
}

int main(void) {
    shmc_segment *seg = NULL;
    OK(shmc_segment_create(3, &seg));
    static int slots[3] = {0, 1, 2};
    for (int i = 0; i < 3; i++) {
        OK(shmc_worker_attach(seg, (uint32_t)i, &workers[i]));
        OK(shmc_on(workers[i], "note", on_note, &slots[i], NULL));
    }
    uint64_t echo_id = 0;
    OK(shmc_on(workers[1], "echo", on_echo, NULL, &echo_id));
    CHECK(echo_id != 0);
    OK(shmc_on_request(workers[2], "later", on_later, NULL, NULL));
    OK(shmc_on_request(workers[2], "refuse", on_refuse, NULL, NULL));
    OK(shmc_on_request(workers[2], "drop", on_drop, NULL, NULL));
    OK(shmc_on(workers[1], "task", on_task, NULL, NULL));
    OK(shmc_on(workers[2], "task", on_task, NULL, NULL));

    shmc_peer peers[3];
    size_t n = 0;
    OK(shmc_peers(workers[0], peers, 3, &n));
    CHECK(n == 3 && peers[2].state == SHMC_WORKER_STATE_READY);
    EXPECT(shmc_peers(workers[0], peers, 1, &n), SHMC_RESULT_BUFFER_TOO_SMALL);

    pthread_t servers[2];
    for (int i = 1; i < 3; i++) CHECK(pthread_create(&servers[i - 1], NULL, serve, workers[i]) == 0);

    /* Emit to one worker, to others, broadcast (the caller included). */
    size_t sent = 0;
    OK(shmc_emit(workers[0], SHMC_TARGET_KIND_WORKER, 1, "note", (const uint8_t *)"hello", 5, &sent));
    CHECK(sent == 1);
    OK(shmc_emit(workers[0], SHMC_TARGET_KIND_OTHERS, 0, "note", (const uint8_t *)"hello", 5, &sent));
    CHECK(sent == 2);
    OK(shmc_broadcast(workers[0], "note", (const uint8_t *)"hello", 5, &sent));
    CHECK(sent == 3);
    for (int i = 0; i < 400 && !(atomic_load(&received[1]) == 3 && atomic_load(&received[2]) == 2 &&
                                 atomic_load(&received[0]) == 1);
         i++)
        OK(shmc_poll(workers[0], 5, NULL));
    CHECK(atomic_load(&received[0]) == 1 && atomic_load(&received[1]) == 3 && atomic_load(&received[2]) == 2);

    /* Request, synchronous answer. */
    shmc_bytes *reply = NULL;
    OK(shmc_request(workers[0], 1, "echo", (const uint8_t *)"abc", 3, T, &reply));
    CHECK(shmc_bytes_len(reply) == 8 && memcmp(shmc_bytes_data(reply), "echo:abc", 8) == 0);
    shmc_bytes_free(reply);

    /* Late reply from another thread; a failure; a dropped reply; no handler. */
    OK(shmc_request(workers[0], 2, "later", NULL, 0, T, &reply));
    CHECK(shmc_bytes_len(reply) == 4 && memcmp(shmc_bytes_data(reply), "late", 4) == 0);
    shmc_bytes_free(reply);
    char text[128];
    EXPECT(shmc_request(workers[0], 2, "refuse", NULL, 0, T, &reply), SHMC_RESULT_HANDLER_FAILED);
    shmc_last_error_message((uint8_t *)text, sizeof text, NULL);
    CHECK(strcmp(text, "refused on purpose") == 0);
    EXPECT(shmc_request(workers[0], 2, "drop", NULL, 0, T, &reply), SHMC_RESULT_HANDLER_FAILED);
    EXPECT(shmc_request(workers[0], 2, "echo", NULL, 0, T, &reply), SHMC_RESULT_NO_HANDLER);
    EXPECT(shmc_request(workers[0], 2, "later", NULL, 0, 0, &reply), SHMC_RESULT_TIMED_OUT);

    /* Map: one entry per live worker, in slot order, with a status each. */
    shmc_map_result *map = NULL;
    OK(shmc_map(workers[0], "echo", (const uint8_t *)"m", 1, T, &map));
    CHECK(shmc_map_result_len(map) == 3);
    shmc_map_entry e;
    OK(shmc_map_result_get(map, 0, &e));
    CHECK(e.slot == 0 && e.status == SHMC_RESULT_NO_HANDLER);
    OK(shmc_map_result_get(map, 1, &e));
    CHECK(e.slot == 1 && e.status == SHMC_RESULT_OK && e.len == 6 && memcmp(e.data, "echo:m", 6) == 0);
    OK(shmc_map_result_get(map, 2, &e));
    CHECK(e.slot == 2 && e.status == SHMC_RESULT_NO_HANDLER);
    EXPECT(shmc_map_result_get(map, 3, &e), SHMC_RESULT_INVALID_ARGUMENT);
    /* Every entry is this host's (no bridge): its host name is "". */
    char host[65];
    size_t host_len = 99;
    OK(shmc_map_result_host(map, 1, (uint8_t *)host, sizeof host, &host_len));
    CHECK(host_len == 0 && host[0] == '\0');
    EXPECT(shmc_map_result_host(map, 3, (uint8_t *)host, sizeof host, &host_len), SHMC_RESULT_INVALID_ARGUMENT);
    EXPECT(shmc_map_result_host(NULL, 0, (uint8_t *)host, sizeof host, &host_len), SHMC_RESULT_NULL_ARGUMENT);
    shmc_map_result_free(map);

    /* Other hosts: without a NATS bridge, unreachable at once (not after
     * the timeout); a name that cannot be a host's is refused too. */
    reply = NULL;
    EXPECT(shmc_request_at(workers[0], "b", 1, "echo", NULL, 0, SHMC_WAIT_FOREVER, &reply),
           SHMC_RESULT_HOST_UNREACHABLE);
    CHECK(reply == NULL);
    EXPECT(shmc_request_at(workers[0], "", 1, "echo", NULL, 0, T, &reply), SHMC_RESULT_HOST_UNREACHABLE);
    EXPECT(shmc_request_at(workers[0], NULL, 1, "echo", NULL, 0, T, &reply), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_request_at(workers[0], "b", 1, "echo", NULL, 0, T, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_emit_at(workers[0], "b", 1, "note", (const uint8_t *)"x", 1), SHMC_RESULT_HOST_UNREACHABLE);
    EXPECT(shmc_emit_at(workers[0], NULL, 1, "note", NULL, 0), SHMC_RESULT_NULL_ARGUMENT);
    OK(shmc_map(workers[0], "refuse", NULL, 0, T, &map));
    OK(shmc_map_result_get(map, 2, &e));
    CHECK(e.status == SHMC_RESULT_HANDLER_FAILED && e.len == 18 && memcmp(e.data, "refused on purpose", 18) == 0);
    shmc_map_result_free(map);

    /* Consume: each task runs on exactly one worker with a handler. */
    for (int i = 0; i < 6; i++) {
        shmc_consumed c;
        OK(shmc_consume(workers[0], "task", (const uint8_t *)"t", 1, T, &c));
        CHECK(c.slot == 1 || c.slot == 2);
    }
    CHECK(atomic_load(&tasks) == 6);
    EXPECT(shmc_consume(workers[0], "nobody", NULL, 0, T, NULL), SHMC_RESULT_NO_HANDLER);

    atomic_store(&stop_servers, 1);
    for (int i = 0; i < 2; i++) pthread_join(servers[i], NULL);

    /* Handlers come off by id or by event. */
    OK(shmc_off_handler(workers[1], echo_id));
    EXPECT(shmc_off_handler(workers[1], echo_id), SHMC_RESULT_INVALID_ARGUMENT);
    size_t removed = 0;
    OK(shmc_off(workers[1], "note", &removed));
    CHECK(removed == 1);

    for (int i = 0; i < 3; i++) OK(shmc_worker_free(workers[i]));
    shmc_segment_free(seg);
    printf("messaging: ok\n");
    return 0;
}
