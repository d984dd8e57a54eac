/* Assertions for the C tests: print the failing line and the library's
 * last error text, then exit 1. */
#ifndef SHMC_CHECK_H
#define SHMC_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include "shmcluster.h"

static void shmc_check_fail(const char *file, int line, const char *expr, uint32_t got, uint32_t want) {
    char msg[512];
    shmc_last_error_message((uint8_t *)msg, sizeof msg, NULL);
    fprintf(stderr, "%s:%d: %s returned %u, expected %u (last error: %s)\n", file, line, expr, got, want, msg);
    exit(1);
}

/* EXPECT(call, SHMC_RESULT_X): the call returns that code. */
#define EXPECT(call, want)                                                               \
    do {                                                                                 \
        uint32_t got_ = (uint32_t)(call);                                                \
        if (got_ != (uint32_t)(want)) shmc_check_fail(__FILE__, __LINE__, #call, got_, (uint32_t)(want)); \
    } while (0)

#define OK(call) EXPECT(call, SHMC_RESULT_OK)

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);     \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

#endif
