/* The C ABI's own cost of a request, with no Python: worker 0 of a 2-slot
 * segment requests from itself (the handler runs inline, answering from C).
 * ctypes_cost.py compiles and runs it (cc, -lshmcluster) to set the floor
 * under its Python rows. Prints the median ns per request of 5 timings. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "shmcluster.h"

static void echo(void *userdata, const shmc_message *m, shmc_reply *reply) {
    (void)userdata;
    shmc_reply_send(reply, m->data, m->len);
}

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    shmc_segment *seg = NULL;
    shmc_worker *w = NULL;
    uint64_t id = 0;
    uint8_t payload[32];
    memset(payload, 7, sizeof payload);
    if (shmc_segment_create(2, &seg) || shmc_worker_attach(seg, 0, &w)
        || shmc_on_request(w, "echo", echo, NULL, &id)) {
        fprintf(stderr, "c_self_request: setup failed\n");
        return 1;
    }
    double runs[5];
    for (int r = -1; r < 5; r++) {
        double t = now_ns();
        for (long i = 0; i < n; i++) {
            shmc_bytes *out = NULL;
            if (shmc_request(w, 0, "echo", payload, sizeof payload, 10000, &out)) {
                fprintf(stderr, "c_self_request: request failed\n");
                return 1;
            }
            if (shmc_bytes_len(out) != sizeof payload) return 1;
            shmc_bytes_free(out);
        }
        if (r >= 0) runs[r] = (now_ns() - t) / (double)n;
    }
    qsort(runs, 5, sizeof runs[0], cmp);
    printf("%.0f\n", runs[2]);
    shmc_worker_free(w);
    shmc_segment_free(seg);
    return 0;
}
