/* Locks: a forked child that holds a lock is SIGKILLed; the next holder
 * sees owner-died and a larger fencing token. Wrong-thread unlock, a
 * worker handle used in a forked child, synchronize with a callback, and
 * a leader with invoke and publish/subscribe. */
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "check.h"

static shmc_lock *held;

static void *unlock_elsewhere(void *arg) {
    (void)arg;
    EXPECT(shmc_unlock(held), SHMC_RESULT_WRONG_THREAD);
    return NULL;
}

struct section_seen {
    int runs;
    uint64_t token;
};

static void section(void *userdata, const shmc_section *s) {
    struct section_seen *seen = userdata;
    seen->runs++;
    seen->token = s->fencing_token;
}

static void on_next_id(void *userdata, const shmc_message *m, shmc_response *r) {
    (void)m;
    uint64_t *counter = userdata;
    ++*counter;
    OK(shmc_response_set(r, (const uint8_t *)counter, sizeof *counter));
}

static void on_config(void *userdata, const shmc_message *m, shmc_response *r) {
    (void)r;
    char *last = userdata;
    CHECK(m->len < 32);
    memcpy(last, m->data, m->len);
    last[m->len] = 0;
}

int main(void) {
    shmc_segment *seg = NULL;
    OK(shmc_segment_create(2, &seg));
    shmc_worker *w = NULL;
    OK(shmc_worker_attach(seg, 0, &w));

    /* A first acquisition: its token. */
    shmc_lock *lock = NULL;
    OK(shmc_lock_acquire(w, "counter", SHMC_WAIT_FOREVER, &lock));
    uint64_t first = shmc_lock_fencing_token(lock);
    CHECK(!shmc_lock_previous_owner_died(lock));

    /* Unlocking on another thread is refused and leaves it held. */
    held = lock;
    pthread_t t;
    CHECK(pthread_create(&t, NULL, unlock_elsewhere, NULL) == 0);
    pthread_join(t, NULL);
    shmc_lock *again = NULL;
    EXPECT(shmc_lock_acquire(w, "counter", 0, &again), SHMC_RESULT_LOCK_WOULD_DEADLOCK);
    OK(shmc_unlock(lock));

    /* A child takes the lock, says so, and is SIGKILLed holding it. */
    int ready[2];
    CHECK(pipe(ready) == 0);
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
        /* The parent's worker is not the child's. */
        if (shmc_ready(w) != SHMC_RESULT_FORKED) _exit(10);
        if (shmc_worker_free(w) != SHMC_RESULT_FORKED) _exit(11);
        shmc_worker *mine = NULL;
        if (shmc_worker_attach(seg, 1, &mine) != SHMC_RESULT_OK) _exit(12);
        shmc_lock *l = NULL;
        if (shmc_lock_acquire(mine, "counter", 10000, &l) != SHMC_RESULT_OK) _exit(13);
        if (write(ready[1], "x", 1) != 1) _exit(14);
        for (;;) pause();
    }
    char c;
    CHECK(read(ready[0], &c, 1) == 1);
    CHECK(kill(child, SIGKILL) == 0);
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child && WIFSIGNALED(status));

    OK(shmc_lock_acquire(w, "counter", 10000, &lock));
    CHECK(shmc_lock_previous_owner_died(lock));
    CHECK(shmc_lock_fencing_token(lock) > first + 1);
    OK(shmc_unlock(lock));
    OK(shmc_lock_acquire(w, "counter", 10000, &lock));
    CHECK(!shmc_lock_previous_owner_died(lock));
    OK(shmc_unlock(lock));

    /* synchronize: the callback runs once, holding the global lock. */
    struct section_seen seen = {0, 0};
    OK(shmc_synchronize(w, "", SHMC_WAIT_FOREVER, section, &seen));
    OK(shmc_synchronize(w, "counter", 1000, section, &seen));
    CHECK(seen.runs == 2 && seen.token > 0);
    EXPECT(shmc_synchronize(w, "counter", 1000, NULL, NULL), SHMC_RESULT_NULL_ARGUMENT);

    /* Leader: the only worker (slot 1's child is dead) leads. */
    uint64_t counter = 0;
    OK(shmc_campaign(w, NULL));
    OK(shmc_on_invoke(w, "next_id", on_next_id, &counter, NULL));
    bool leading = false;
    for (int i = 0; i < 200 && !leading; i++) {
        OK(shmc_poll(w, 5, NULL));
        OK(shmc_is_leader(w, NULL, &leading));
    }
    CHECK(leading);
    uint32_t slot = 99;
    uint64_t term = 0;
    OK(shmc_leader(w, NULL, &slot, &term));
    CHECK(slot == 0 && term > 0);
    shmc_bytes *r = NULL;
    OK(shmc_invoke(w, "next_id", NULL, 0, 10000, &r));
    CHECK(shmc_bytes_len(r) == 8 && *(const uint64_t *)shmc_bytes_data(r) == 1);
    shmc_bytes_free(r);
    EXPECT(shmc_invoke(w, "no_such_method", NULL, 0, 10000, &r), SHMC_RESULT_NO_HANDLER);
    char last[32] = "";
    OK(shmc_subscribe(w, "config", 10000, on_config, last));
    OK(shmc_publish(w, "config", (const uint8_t *)"v2", 2, 10000));
    for (int i = 0; i < 200 && strcmp(last, "v2") != 0; i++) OK(shmc_poll(w, 5, NULL));
    CHECK(strcmp(last, "v2") == 0);

    OK(shmc_worker_free(w));
    shmc_segment_free(seg);
    printf("locks: ok\n");
    return 0;
}
