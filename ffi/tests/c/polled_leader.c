/* The event-loop driver's leader calls and bounded emit: an invoke started
 * without waiting (NO_LEADER at its deadline with no leader; answered later
 * by an async invoke handler; the idempotent flag), a publish, subscribes
 * that never wait for a leader (the turn that first sees one tells it; the
 * last value comes at once to a late subscriber), and shmc_emit_timeout
 * returning TIMED_OUT at its bound on a full lane instead of waiting for
 * the reader. Run under valgrind too: every list and reply is freed. */
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "check.h"

#define T 10000 /* ms */

static shmc_worker *w[2];
static int fds[2];
static shmc_reply *held; /* an invoke's reply answered after its handler */
static int answer_now;   /* the invoke handler answers at once */
static char got_t[64], got_u[64];
static int events;

static void on_add(void *userdata, const shmc_message *m, shmc_reply *reply) {
    (void)userdata;
    if (answer_now) {
        OK(shmc_reply_send(reply, m->data, m->len));
        return;
    }
    CHECK(held == NULL);
    held = reply;
}

static void on_topic(void *userdata, const shmc_message *m, shmc_response *response) {
    (void)response;
    snprintf((char *)userdata, 64, "%.*s", (int)m->len, (const char *)m->data);
}

static void on_event(void *userdata, const shmc_message *m, shmc_response *response) {
    (void)userdata;
    (void)m;
    (void)response;
    events++;
}

static void spin(void) {
    for (int i = 0; i < 2; i++) {
        uint32_t turn = SHMC_TURN_KIND_BUSY;
        while (turn == SHMC_TURN_KIND_BUSY) OK(shmc_turn(w[i], &turn));
        CHECK(turn == SHMC_TURN_KIND_PARKED);
    }
    uint64_t due = 0;
    OK(shmc_next_due(w[0], &due));
    struct pollfd p[2] = {{fds[0], POLLIN, 0}, {fds[1], POLLIN, 0}};
    poll(p, 2, due < 20 ? (int)due : 20);
    for (int i = 0; i < 2; i++) {
        uint64_t count;
        if (p[i].revents & POLLIN) CHECK(read(fds[i], &count, 8) == 8);
        OK(shmc_unpark(w[i]));
    }
}

static shmc_finished *wait_end(uint64_t ticket, shmc_call_end *end) {
    for (int round = 0; round < 2000; round++) {
        spin();
        shmc_finished *f = NULL;
        OK(shmc_take_finished(w[0], &f));
        for (size_t i = 0; i < shmc_finished_len(f); i++) {
            OK(shmc_finished_get(f, i, end));
            if (end->ticket == ticket) return f;
        }
        shmc_finished_free(f);
    }
    CHECK(!"the call never ended");
    return NULL;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int main(void) {
    shmc_segment *seg = NULL;
    OK(shmc_segment_create(2, &seg));
    for (int i = 0; i < 2; i++) {
        OK(shmc_worker_attach(seg, (uint32_t)i, &w[i]));
        OK(shmc_wake_fd(w[i], &fds[i]));
    }

    /* Arguments. */
    uint64_t ticket = 0;
    bool told = true;
    EXPECT(shmc_start_invoke(NULL, "add", NULL, 0, T, false, &ticket), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_start_invoke(w[0], "add", NULL, 0, T, false, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_start_invoke(w[0], NULL, NULL, 0, T, false, &ticket), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_start_publish(w[0], "t", NULL, 5, T, &ticket), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_start_publish(w[0], "\xff", NULL, 0, T, &ticket), SHMC_RESULT_INVALID_ARGUMENT);
    EXPECT(shmc_subscribe_polled(w[0], "t", NULL, NULL, &told), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_subscribe_polled(w[0], NULL, on_topic, got_t, &told), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_on_invoke_async(w[1], "add", NULL, NULL, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_emit_timeout(w[0], 7, 0, "ev", NULL, 0, 10, NULL), SHMC_RESULT_INVALID_ARGUMENT);

    /* No leader: the invoke ends NO_LEADER at its deadline; a subscribe
     * does not wait (nobody told). */
    shmc_call_end end;
    OK(shmc_start_invoke(w[0], "add", (const uint8_t *)"x", 1, 100, false, &ticket));
    shmc_finished *f = wait_end(ticket, &end);
    CHECK(end.kind == SHMC_END_KIND_ANSWER && end.status == SHMC_RESULT_NO_LEADER);
    shmc_finished_free(f);
    OK(shmc_subscribe_polled(w[0], "t", on_topic, got_t, &told));
    CHECK(!told);

    /* Worker 1 registers the handler (and campaigns): it leads. */
    uint64_t id = 0;
    OK(shmc_on_invoke_async(w[1], "add", on_add, NULL, &id));
    CHECK(id != 0);
    uint32_t slot = 99;
    for (int k = 0; k < 500 && shmc_leader(w[0], NULL, &slot, NULL) != SHMC_RESULT_OK; k++) spin();
    CHECK(slot == 1);

    /* An invoke answered after its handler returned. */
    OK(shmc_start_invoke(w[0], "add", (const uint8_t *)"x", 1, T, false, &ticket));
    for (int k = 0; k < 500 && held == NULL; k++) spin();
    CHECK(held != NULL);
    OK(shmc_reply_send(held, (const uint8_t *)"later", 5));
    held = NULL;
    f = wait_end(ticket, &end);
    CHECK(end.status == SHMC_RESULT_OK && end.len == 5 && memcmp(end.data, "later", 5) == 0);
    shmc_finished_free(f);
    /* Idempotent, answered at once; a failure's text. */
    answer_now = 1;
    OK(shmc_start_invoke(w[0], "add", (const uint8_t *)"y", 1, T, true, &ticket));
    f = wait_end(ticket, &end);
    CHECK(end.status == SHMC_RESULT_OK && end.len == 1 && end.data[0] == 'y');
    shmc_finished_free(f);
    OK(shmc_start_invoke(w[0], "nobody", NULL, 0, T, false, &ticket));
    f = wait_end(ticket, &end);
    CHECK(end.status == SHMC_RESULT_NO_HANDLER);
    shmc_finished_free(f);

    /* A publish reaches the subscriber the turns told of the leader. */
    OK(shmc_start_publish(w[0], "t", (const uint8_t *)"v1", 2, T, &ticket));
    f = wait_end(ticket, &end);
    CHECK(end.status == SHMC_RESULT_OK && end.len == 0);
    shmc_finished_free(f);
    for (int k = 0; k < 500 && strcmp(got_t, "v1") != 0; k++) spin();
    CHECK(strcmp(got_t, "v1") == 0);
    /* A late subscriber gets the last value; the leader is told now. */
    OK(shmc_start_publish(w[1], "u", (const uint8_t *)"last", 4, T, &ticket));
    for (int k = 0; k < 20; k++) spin();
    OK(shmc_subscribe_polled(w[0], "u", on_topic, got_u, &told));
    CHECK(told);
    for (int k = 0; k < 500 && strcmp(got_u, "last") != 0; k++) spin();
    CHECK(strcmp(got_u, "last") == 0);

    /* A full lane: with worker 1 not turned, emits fill the lane to it;
     * the one that finds it full returns TIMED_OUT at its bound. */
    OK(shmc_on(w[1], "ev", on_event, NULL, NULL));
    static uint8_t chunk[1024];
    int sent = 0;
    size_t n = 0;
    shmc_result r;
    while ((r = shmc_emit_timeout(w[0], SHMC_TARGET_KIND_WORKER, 1, "ev", chunk, sizeof chunk, 0, &n)) ==
           SHMC_RESULT_OK) {
        CHECK(n == 1);
        sent++;
        CHECK(sent < 100000);
    }
    EXPECT(r, SHMC_RESULT_TIMED_OUT);
    CHECK(sent > 10);
    double t0 = now_ms();
    EXPECT(shmc_emit_timeout(w[0], SHMC_TARGET_KIND_WORKER, 1, "ev", chunk, sizeof chunk, 50, &n),
           SHMC_RESULT_TIMED_OUT);
    double took = now_ms() - t0;
    CHECK(took >= 45 && took < 5000);
    for (int k = 0; k < 500 && events < sent; k++) spin();
    CHECK(events == sent);
    OK(shmc_emit_timeout(w[0], SHMC_TARGET_KIND_ALL, 0, "ev", NULL, 0, 50, &n));
    CHECK(n == 2);

    for (int k = 0; k < 2; k++) OK(shmc_worker_free(w[k]));
    shmc_segment_free(seg);
    return 0;
}
