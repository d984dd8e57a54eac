/* A shmcluster worker in C, started by a master in spawn mode:
 *
 *     shmcluster::Cluster::builder().workers(4).command(["./worker"])
 *
 * It attaches from its environment, registers a "ping" handler, takes its
 * inherited listener (if any), declares itself ready and serves until the
 * master tells it to stop. Instance 0 waits until every instance is ready,
 * maps "ping" over the cluster, prints the answers and asks the master to
 * shut the cluster down.
 *
 * Build and run, from the repository root:
 *
 *     cargo build --release -p shmcluster -p shmcluster-ffi
 *     cc -I ffi/include ffi/examples/worker.c -L target/release -Wl,-rpath,'$ORIGIN' -lshmcluster -o target/release/c-worker
 *     target/release/shmcluster run -w 2 -- target/release/c-worker
 *
 * The rpath `$ORIGIN` makes the program look for libshmcluster.so in its
 * own directory, where the -o above puts it; built elsewhere, give an
 * absolute -Wl,-rpath or run it with LD_LIBRARY_PATH=target/release.
 * ffi/tests/c_example.rs runs these lines (in the test's own profile).
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "shmcluster.h"

static void fail(const char *what, shmc_result r) {
    char text[256];
    shmc_last_error_message((uint8_t *)text, sizeof text, NULL);
    fprintf(stderr, "worker: %s: error %u: %s\n", what, (unsigned)r, text);
}

/* "ping": answers "pong from slot N". Runs on the thread that calls shmc_run. */
static void on_ping(void *userdata, const shmc_message *msg, shmc_response *response) {
    (void)msg;
    const shmc_identity *me = userdata;
    char answer[64];
    int n = snprintf(answer, sizeof answer, "pong from slot %u", (unsigned)me->slot);
    shmc_response_set(response, (const uint8_t *)answer, (size_t)n);
}

int main(void) {
    if (shmc_check_abi_version(SHMC_ABI_VERSION) != SHMC_RESULT_OK) {
        fprintf(stderr, "worker: shmcluster.h does not match libshmcluster\n");
        return 2;
    }
    shmc_worker *w = NULL;
    shmc_result r = shmc_worker_from_env(&w);
    if (r != SHMC_RESULT_OK) {
        fail("attach (is this started by a shmcluster master?)", r);
        return 2;
    }
    static shmc_identity me;
    shmc_identity_get(w, &me);
    shmc_on(w, "ping", on_ping, &me, NULL);

    /* Inherited listeners: this process owns a taken descriptor. */
    size_t listeners = 0;
    shmc_listener_count(w, &listeners);
    for (size_t i = 0; i < listeners; i++) {
        int fd = -1;
        if (shmc_listener_take(w, i, &fd) == SHMC_RESULT_OK) {
            /* A real server would loop on shmc_worker_accept(w, fd, ...)
             * until SHMC_RESULT_STOPPING; this one just closes it. */
            close(fd);
        }
    }

    shmc_ready(w);
    if (me.index == 0) {
        bool all = false;
        shmc_wait_all_ready(w, 10000, &all);
        shmc_map_result *answers = NULL;
        r = shmc_map(w, "ping", NULL, 0, 5000, &answers);
        if (r == SHMC_RESULT_OK) {
            for (size_t i = 0; i < shmc_map_result_len(answers); i++) {
                shmc_map_entry e;
                shmc_map_result_get(answers, i, &e);
                if (e.status == SHMC_RESULT_OK)
                    printf("slot %u: %.*s\n", (unsigned)e.slot, (int)e.len, (const char *)e.data);
                else
                    printf("slot %u: error %u\n", (unsigned)e.slot, (unsigned)e.status);
            }
            fflush(stdout);
            shmc_map_result_free(answers);
        } else {
            fail("map", r);
        }
        shmc_request_shutdown(w);
    }
    r = shmc_run(w); /* until the master says stop (or SIGTERM) */
    if (r != SHMC_RESULT_OK) fail("run", r);
    shmc_worker_free(w);
    return r == SHMC_RESULT_OK ? 0 : 1;
}
