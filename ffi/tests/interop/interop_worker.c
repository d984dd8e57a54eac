/* The C worker of tests/interop.rs, and its attach-error checks.
 *
 *   interop_worker                 instance 1 of `shmcluster run`: the
 *                                  coordinator (hello broadcast, a map over
 *                                  every language, waiting on a lock Python
 *                                  holds, the next holder after a SIGKILL,
 *                                  then the Rust worker's turn)
 *   interop_worker abi             prints shmc_check_abi_version's answers
 *   interop_worker bad-fd PATH     SHMCLUSTER_FD names PATH opened read-write
 *   interop_worker closed-fd       SHMCLUSTER_FD names a descriptor not open
 *
 * Results go to files in $INTEROP_DIR (written to a temporary name and
 * renamed, so the test never reads half a file) or to stdout; the test
 * asserts on them. Every wait here has a deadline.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "shmcluster.h"

#define MAX_HELLOS 32

static struct {
    shmc_identity me;
    unsigned hello_slots[MAX_HELLOS];
    char hellos[MAX_HELLOS][64];
    int n_hellos;
    int held;
    int holding;
    int rust_done;
    char rust_result[256];
} st;

static const char *dir;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void last_error(char *buf, size_t len) {
    size_t n = 0;
    shmc_last_error_message((uint8_t *)buf, len, &n);
}

/* Writes `text` to $INTEROP_DIR/name atomically. */
static void put(const char *name, const char *text) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        perror(tmp);
        return;
    }
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

static void copy_payload(char *dst, size_t cap, const shmc_message *m) {
    size_t n = m->len < cap - 1 ? m->len : cap - 1;
    if (n)
        memcpy(dst, m->data, n);
    dst[n] = 0;
}

static void on_hello(void *u, const shmc_message *m, shmc_response *r) {
    (void)u;
    (void)r;
    if (st.n_hellos < MAX_HELLOS) {
        st.hello_slots[st.n_hellos] = m->sender_slot;
        copy_payload(st.hellos[st.n_hellos], sizeof st.hellos[0], m);
        st.n_hellos++;
    }
}

static void on_whoami(void *u, const shmc_message *m, shmc_response *r) {
    (void)u;
    (void)m;
    char answer[64];
    int n = snprintf(answer, sizeof answer, "c:%u:%u", (unsigned)st.me.index, (unsigned)st.me.slot);
    shmc_response_set(r, (const uint8_t *)answer, (size_t)n);
}

static void on_flag(void *u, const shmc_message *m, shmc_response *r) {
    (void)m;
    (void)r;
    *(int *)u += 1;
}

static void on_rust_done(void *u, const shmc_message *m, shmc_response *r) {
    (void)u;
    (void)r;
    copy_payload(st.rust_result, sizeof st.rust_result, m);
    st.rust_done = 1;
}

/* Serves messages until *flag is set or `ms` pass; whether it was set. */
static int poll_until(shmc_worker *w, const int *flag, uint64_t ms) {
    uint64_t deadline = now_ns() + ms * 1000000u;
    while (!*flag && now_ns() < deadline && !shmc_should_stop(w))
        shmc_poll(w, 20, NULL);
    return *flag != 0;
}

/* The slot of instance `index` (UINT32_MAX if none) and its generation. */
static uint32_t slot_of(shmc_worker *w, uint32_t index, uint32_t *generation, shmc_worker_state *state) {
    shmc_peer peers[16];
    size_t count = 0;
    if (shmc_peers(w, peers, 16, &count) != SHMC_RESULT_OK)
        return UINT32_MAX;
    for (size_t i = 0; i < count && i < 16; i++) {
        if (peers[i].index == index && peers[i].state != SHMC_WORKER_STATE_FREE) {
            if (generation)
                *generation = peers[i].generation;
            if (state)
                *state = peers[i].state;
            return peers[i].slot;
        }
    }
    return UINT32_MAX;
}

static int coordinator(void) {
    char text[4096], err[512];
    shmc_worker *w = NULL;
    shmc_result r = shmc_worker_from_env(&w);
    if (r != SHMC_RESULT_OK) {
        last_error(err, sizeof err);
        fprintf(stderr, "c worker: from_env: %u %s\n", (unsigned)r, err);
        return 2;
    }
    shmc_identity_get(w, &st.me);
    shmc_on(w, "hello", on_hello, NULL, NULL);
    shmc_on(w, "whoami", on_whoami, NULL, NULL);
    shmc_on(w, "held", on_flag, &st.held, NULL);
    shmc_on(w, "holding", on_flag, &st.holding, NULL);
    shmc_on(w, "rust-done", on_rust_done, NULL, NULL);
    shmc_ready(w);
    bool all = false;
    shmc_wait_all_ready(w, 15000, &all);

    /* 1: one hello to every live worker, this one included. */
    size_t sent = 0;
    r = shmc_broadcast(w, "hello", (const uint8_t *)"c:1", 3, &sent);
    snprintf(text, sizeof text, "all_ready=%d result=%u sent=%zu\n", all, (unsigned)r, sent);
    put("c-broadcast.txt", text);

    /* 2: a map over Rust, C and Python workers. */
    shmc_map_result *res = NULL;
    r = shmc_map(w, "whoami", NULL, 0, 5000, &res);
    size_t off = (size_t)snprintf(text, sizeof text, "result=%u\n", (unsigned)r);
    for (size_t i = 0; r == SHMC_RESULT_OK && i < shmc_map_result_len(res); i++) {
        shmc_map_entry e;
        shmc_map_result_get(res, i, &e);
        off += (size_t)snprintf(text + off, sizeof text - off, "%u %u %.*s\n", (unsigned)e.slot,
                                (unsigned)e.status, (int)e.len, (const char *)e.data);
    }
    shmc_map_result_free(res);
    put("c-map.txt", text);

    /* 3: Python (instance 2) holds "shared" for ~300 ms; this worker waits. */
    uint32_t py = slot_of(w, 2, NULL, NULL);
    r = shmc_emit(w, SHMC_TARGET_KIND_WORKER, py, "hold", NULL, 0, NULL);
    int held = r == SHMC_RESULT_OK && poll_until(w, &st.held, 10000);
    uint64_t t0 = now_ns();
    shmc_lock *lock = NULL;
    shmc_result lr = held ? shmc_lock_acquire(w, "shared", 10000, &lock) : SHMC_RESULT_UNKNOWN;
    uint64_t t1 = now_ns();
    int died = lock ? shmc_lock_previous_owner_died(lock) : -1;
    shmc_result ur = lock ? shmc_unlock(lock) : SHMC_RESULT_UNKNOWN;
    snprintf(text, sizeof text,
             "emit=%u held=%d lock=%u unlock=%u waited_ns=%llu start_ns=%llu acquired_ns=%llu owner_died=%d\n",
             (unsigned)r, held, (unsigned)lr, (unsigned)ur, (unsigned long long)(t1 - t0),
             (unsigned long long)t0, (unsigned long long)t1, died);
    put("c-lock.txt", text);

    /* 5a: the Python victim (instance 3) is SIGKILLed holding "victim-c". */
    uint32_t gen1 = 0;
    uint32_t victim = slot_of(w, 3, &gen1, NULL);
    r = shmc_emit(w, SHMC_TARGET_KIND_WORKER, victim, "die", (const uint8_t *)"victim-c", 8, NULL);
    int holding = r == SHMC_RESULT_OK && poll_until(w, &st.holding, 10000);
    lock = NULL;
    lr = holding ? shmc_lock_acquire(w, "victim-c", 10000, &lock) : SHMC_RESULT_UNKNOWN;
    died = lock ? shmc_lock_previous_owner_died(lock) : -1;
    uint64_t token = lock ? shmc_lock_fencing_token(lock) : 0;
    ur = lock ? shmc_unlock(lock) : SHMC_RESULT_UNKNOWN;
    /* Taken again: the mutex was made consistent, nobody died this time. */
    lock = NULL;
    shmc_result lr2 = shmc_lock_acquire(w, "victim-c", 10000, &lock);
    int died2 = lock ? shmc_lock_previous_owner_died(lock) : -1;
    uint64_t token2 = lock ? shmc_lock_fencing_token(lock) : 0;
    shmc_unlock(lock);
    snprintf(text, sizeof text,
             "emit=%u holding=%d lock=%u unlock=%u owner_died=%d token=%llu lock2=%u owner_died2=%d "
             "token2=%llu victim_generation=%u\n",
             (unsigned)r, holding, (unsigned)lr, (unsigned)ur, died, (unsigned long long)token,
             (unsigned)lr2, died2, (unsigned long long)token2, (unsigned)gen1);
    put("c-ownerdied.txt", text);

    /* The master respawns the victim in its slot; then it is Rust's turn. */
    uint64_t deadline = now_ns() + 15000000000ull;
    uint32_t gen2 = 0;
    shmc_worker_state state = SHMC_WORKER_STATE_FREE;
    while (now_ns() < deadline && !shmc_should_stop(w)) {
        if (slot_of(w, 3, &gen2, &state) == victim && gen2 > gen1 && state == SHMC_WORKER_STATE_READY)
            break;
        shmc_poll(w, 20, NULL);
    }
    uint32_t rust = slot_of(w, 0, NULL, NULL);
    char victim_text[16];
    int n = snprintf(victim_text, sizeof victim_text, "%u", (unsigned)victim);
    r = shmc_emit(w, SHMC_TARGET_KIND_WORKER, rust, "rust-round", (const uint8_t *)victim_text, (size_t)n, NULL);
    int done = r == SHMC_RESULT_OK && poll_until(w, &st.rust_done, 15000);
    snprintf(text, sizeof text, "respawned_generation=%u state=%u emit=%u rust_done=%d rust=%s\n",
             (unsigned)gen2, (unsigned)state, (unsigned)r, done, st.rust_result);
    put("c-done.txt", text);

    /* Serve until `shmcluster stop`. */
    r = shmc_run(w);
    off = 0;
    for (int i = 0; i < st.n_hellos; i++)
        off += (size_t)snprintf(text + off, sizeof text - off, "%u %s\n", st.hello_slots[i], st.hellos[i]);
    text[off] = 0;
    put("hello-1.txt", text);
    shmc_worker_free(w);
    return r == SHMC_RESULT_OK ? 0 : 1;
}

/* Sets the environment a master would give slot 1 of 1 instance. */
static void fake_env(int fd) {
    char num[16];
    snprintf(num, sizeof num, "%d", fd);
    setenv("SHMCLUSTER_FD", num, 1);
    setenv("SHMCLUSTER_WORKER", "1", 1);
    setenv("SHMCLUSTER_WORKERS", "1", 1);
    setenv("SHMCLUSTER_GENERATION", "1", 1);
    setenv("SHMCLUSTER_INDEX", "0", 1);
    unsetenv("SHMCLUSTER_CONTROL_FD");
}

static int attach_error(int fd) {
    fake_env(fd);
    shmc_worker *w = NULL;
    shmc_result r = shmc_worker_from_env(&w);
    char err[512] = "";
    last_error(err, sizeof err);
    printf("from_env=%u worker_null=%d message=%s\n", (unsigned)r, w == NULL, err);
    /* Still a working library: a segment of its own, a request to itself. */
    shmc_segment *seg = NULL;
    shmc_worker *me = NULL;
    shmc_result cr = shmc_segment_create(1, &seg);
    shmc_result ar = cr == SHMC_RESULT_OK ? shmc_worker_attach(seg, 0, &me) : cr;
    printf("after: create=%u attach=%u\n", (unsigned)cr, (unsigned)ar);
    shmc_worker_free(me);
    shmc_segment_free(seg);
    shmc_worker_free(w);
    return 0;
}

int main(int argc, char **argv) {
    if (shmc_check_abi_version(SHMC_ABI_VERSION) != SHMC_RESULT_OK) {
        fprintf(stderr, "c worker: shmcluster.h does not match libshmcluster\n");
        return 2;
    }
    if (argc > 1 && strcmp(argv[1], "abi") == 0) {
        printf("abi_ok=%u abi_next=%u abi_zero=%u library=%u header=%u\n",
               (unsigned)shmc_check_abi_version(SHMC_ABI_VERSION),
               (unsigned)shmc_check_abi_version(SHMC_ABI_VERSION + 1), (unsigned)shmc_check_abi_version(0),
               (unsigned)shmc_abi_version(), (unsigned)SHMC_ABI_VERSION);
        char text[256] = "";
        shmc_error_string(SHMC_RESULT_ABI_VERSION_MISMATCH, (uint8_t *)text, sizeof text, NULL);
        printf("text=%s\n", text);
        return 0;
    }
    if (argc > 2 && strcmp(argv[1], "bad-fd") == 0) {
        int fd = open(argv[2], O_RDWR);
        if (fd < 0) {
            perror(argv[2]);
            return 2;
        }
        return attach_error(fd);
    }
    if (argc > 1 && strcmp(argv[1], "closed-fd") == 0)
        return attach_error(987);
    dir = getenv("INTEROP_DIR");
    if (!dir) {
        fprintf(stderr, "c worker: INTEROP_DIR is not set\n");
        return 2;
    }
    return coordinator();
}
