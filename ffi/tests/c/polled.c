/* The event-loop driver: calls started without waiting (shmc_start_*),
 * turned to their ends with shmc_turn while the thread waits on the slots'
 * eventfds with poll(2), taken with shmc_take_finished; replies answered
 * after the handler returned; the argument checks; a lock taken through a
 * lock table on another thread while the worker is busy. Run under
 * valgrind too: every list, map result and reply is freed. */
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>
#include "check.h"

#define T 10000 /* ms */

static shmc_worker *w[2];
static int fds[2];
static shmc_reply *held; /* a reply kept past its handler, answered later */

static void on_echo(void *userdata, const shmc_message *m, shmc_reply *reply) {
    char buf[64];
    int n = snprintf(buf, sizeof buf, "%d:%.*s", *(int *)userdata, (int)m->len, (const char *)m->data);
    OK(shmc_reply_send(reply, (const uint8_t *)buf, (size_t)n));
}

static void on_later(void *userdata, const shmc_message *m, shmc_reply *reply) {
    (void)userdata;
    (void)m;
    CHECK(held == NULL);
    held = reply;
}

static void on_fail(void *userdata, const shmc_message *m, shmc_reply *reply) {
    (void)userdata;
    (void)m;
    OK(shmc_reply_fail(reply, "nope"));
}

/* Turns both workers until each parks, then waits on their eventfds (or
 * the next due time, at most 50 ms) and unparks the ones that woke. */
static void spin(void) {
    for (int i = 0; i < 2; i++) {
        uint32_t turn = SHMC_TURN_KIND_BUSY;
        while (turn == SHMC_TURN_KIND_BUSY) OK(shmc_turn(w[i], &turn));
        CHECK(turn == SHMC_TURN_KIND_PARKED);
    }
    uint64_t due = 0;
    OK(shmc_next_due(w[0], &due));
    struct pollfd p[2] = {{fds[0], POLLIN, 0}, {fds[1], POLLIN, 0}};
    poll(p, 2, due < 50 ? (int)due : 50);
    for (int i = 0; i < 2; i++) {
        uint64_t count;
        if (p[i].revents & POLLIN) CHECK(read(fds[i], &count, 8) == 8);
        OK(shmc_unpark(w[i]));
    }
}

/* Spins until worker 0's call `ticket` ends; copies its end and returns the
 * list it is in (the caller frees it). */
static shmc_finished *wait_end(uint64_t ticket, shmc_call_end *end, size_t *index) {
    for (int round = 0; round < 2000; round++) {
        spin();
        shmc_finished *f = NULL;
        OK(shmc_take_finished(w[0], &f));
        for (size_t i = 0; i < shmc_finished_len(f); i++) {
            OK(shmc_finished_get(f, i, end));
            if (end->ticket == ticket) {
                *index = i;
                return f;
            }
        }
        shmc_finished_free(f);
    }
    CHECK(!"the call never ended");
    return NULL;
}

static shmc_locks *table;
static int taken_elsewhere = -1;

static void *lock_elsewhere(void *arg) {
    (void)arg;
    shmc_lock *l = NULL;
    taken_elsewhere = (int)shmc_locks_acquire(table, "polled", T, &l);
    OK(shmc_unlock(l));
    return NULL;
}

int main(void) {
    shmc_segment *seg = NULL;
    static int ids[2] = {0, 1};
    OK(shmc_segment_create(2, &seg));
    for (int i = 0; i < 2; i++) {
        OK(shmc_worker_attach(seg, (uint32_t)i, &w[i]));
        OK(shmc_wake_fd(w[i], &fds[i]));
        CHECK(fds[i] >= 0);
        OK(shmc_on_request(w[i], "echo", on_echo, &ids[i], NULL));
    }
    OK(shmc_on_request(w[1], "later", on_later, NULL, NULL));
    OK(shmc_on_request(w[1], "fail", on_fail, NULL, NULL));

    /* Arguments. */
    uint64_t ticket = 0;
    uint32_t turn = 0;
    int fd = 0;
    EXPECT(shmc_start_request(NULL, 1, "echo", NULL, 0, T, &ticket), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_start_request(w[0], 1, "echo", NULL, 0, T, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_start_request(w[0], 1, NULL, NULL, 0, T, &ticket), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_start_request(w[0], 1, "echo", NULL, 3, T, &ticket), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_start_map(w[0], "\xff", NULL, 0, T, &ticket), SHMC_RESULT_INVALID_ARGUMENT);
    EXPECT(shmc_turn(w[0], NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_turn(NULL, &turn), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_wake_fd(w[0], NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_wake_fd(NULL, &fd), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_next_due(w[0], NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_take_finished(w[0], NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_unpark(NULL), SHMC_RESULT_NULL_ARGUMENT);
    CHECK(shmc_finished_len(NULL) == 0);
    shmc_finished_free(NULL);
    shmc_locks_free(NULL);
    uint64_t due = 0;
    OK(shmc_next_due(w[0], &due));
    CHECK(due == SHMC_WAIT_FOREVER); /* nothing started */

    /* A request, answered by the handler at once. */
    shmc_call_end end;
    size_t i = 0;
    OK(shmc_start_request(w[0], 1, "echo", (const uint8_t *)"hi", 2, T, &ticket));
    OK(shmc_next_due(w[0], &due));
    CHECK(due <= T);
    shmc_finished *f = wait_end(ticket, &end, &i);
    CHECK(end.kind == SHMC_END_KIND_ANSWER && end.status == SHMC_RESULT_OK);
    CHECK(end.len == 4 && memcmp(end.data, "1:hi", 4) == 0);
    shmc_map_result *m = NULL;
    EXPECT(shmc_finished_take_map(f, i, &m), SHMC_RESULT_INVALID_ARGUMENT); /* not a map */
    EXPECT(shmc_finished_get(f, 99, &end), SHMC_RESULT_INVALID_ARGUMENT);
    shmc_finished_free(f);

    /* A reply kept past the handler and answered later: the call waits. */
    OK(shmc_start_request(w[0], 1, "later", NULL, 0, T, &ticket));
    for (int k = 0; k < 200 && held == NULL; k++) spin();
    CHECK(held != NULL);
    OK(shmc_reply_send(held, (const uint8_t *)"late", 4));
    held = NULL;
    f = wait_end(ticket, &end, &i);
    CHECK(end.status == SHMC_RESULT_OK && end.len == 4 && memcmp(end.data, "late", 4) == 0);
    shmc_finished_free(f);

    /* Failures: the handler's text, no handler, no such worker. */
    OK(shmc_start_request(w[0], 1, "fail", NULL, 0, T, &ticket));
    f = wait_end(ticket, &end, &i);
    CHECK(end.status == SHMC_RESULT_HANDLER_FAILED && end.len == 4 && memcmp(end.data, "nope", 4) == 0);
    shmc_finished_free(f);
    OK(shmc_start_request(w[0], 1, "nobody", NULL, 0, T, &ticket));
    f = wait_end(ticket, &end, &i);
    CHECK(end.status == SHMC_RESULT_NO_HANDLER);
    shmc_finished_free(f);

    /* A map: both workers; the entries moved out once. */
    OK(shmc_start_map(w[0], "echo", (const uint8_t *)"m", 1, T, &ticket));
    f = wait_end(ticket, &end, &i);
    CHECK(end.kind == SHMC_END_KIND_MAP && end.status == SHMC_RESULT_OK);
    OK(shmc_finished_take_map(f, i, &m));
    EXPECT(shmc_finished_take_map(f, i, &m), SHMC_RESULT_INVALID_ARGUMENT);
    CHECK(shmc_map_result_len(m) == 2);
    for (size_t k = 0; k < 2; k++) {
        shmc_map_entry e;
        OK(shmc_map_result_get(m, k, &e));
        CHECK(e.status == SHMC_RESULT_OK && e.len == 3 && ((const char *)e.data)[0] == (char)('0' + e.slot));
    }
    shmc_map_result_free(m);
    shmc_finished_free(f);

    /* A map whose entries are never taken: freed with the list. */
    OK(shmc_start_map(w[0], "echo", NULL, 0, T, &ticket));
    f = wait_end(ticket, &end, &i);
    CHECK(end.kind == SHMC_END_KIND_MAP);
    shmc_finished_free(f);

    /* A consume. */
    OK(shmc_start_consume(w[0], "later", (const uint8_t *)"t", 1, T, &ticket));
    for (int k = 0; k < 200 && held == NULL; k++) spin();
    CHECK(held != NULL);
    OK(shmc_reply_send(held, NULL, 0));
    held = NULL;
    f = wait_end(ticket, &end, &i);
    CHECK(end.kind == SHMC_END_KIND_CONSUMED && end.status == SHMC_RESULT_OK);
    CHECK(end.consumed.slot == 1 && end.consumed.delivery_id != 0 && end.consumed.attempts >= 1);
    shmc_finished_free(f);

    /* A deadline: the reply held past it. */
    OK(shmc_start_request(w[0], 1, "later", NULL, 0, 50, &ticket));
    f = wait_end(ticket, &end, &i);
    CHECK(end.status == SHMC_RESULT_TIMED_OUT);
    shmc_finished_free(f);
    CHECK(held != NULL);
    shmc_reply_free(held); /* too late: the caller has given up */
    held = NULL;

    /* The lock table: another thread takes a lock while this one holds
     * the worker (shmc_lock_acquire there would be BUSY). */
    OK(shmc_worker_locks(w[0], &table));
    EXPECT(shmc_locks_acquire(table, "polled", T, NULL), SHMC_RESULT_NULL_ARGUMENT);
    shmc_lock *mine = NULL;
    OK(shmc_locks_acquire(table, "polled", T, &mine));
    EXPECT(shmc_locks_acquire(table, "polled", 0, &mine), SHMC_RESULT_LOCK_WOULD_DEADLOCK);
    OK(shmc_unlock(mine));
    pthread_t t;
    CHECK(pthread_create(&t, NULL, lock_elsewhere, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(taken_elsewhere == SHMC_RESULT_OK);

    for (int k = 0; k < 2; k++) OK(shmc_worker_free(w[k]));
    shmc_locks_free(table); /* outlives its worker */
    shmc_segment_free(seg);
    return 0;
}
