/* Enum arguments from C are plain uint32_t: a value that names no variant
 * is SHMC_RESULT_INVALID_ARGUMENT and does nothing (issue 12, item 3).
 * shmc_emit with target kind 3, 7 or 0xFFFFFFFF must not send anything;
 * the valid kinds still work. */
#include <string.h>
#include "check.h"

static int received;

static void on_note(void *userdata, const shmc_message *m, shmc_response *r) {
    (void)userdata;
    (void)m;
    (void)r;
    received++;
}

int main(void) {
    shmc_segment *seg = NULL;
    OK(shmc_segment_create(2, &seg));
    shmc_worker *w = NULL;
    OK(shmc_worker_attach(seg, 0, &w));
    OK(shmc_on(w, "note", on_note, NULL, NULL));

    const uint32_t bad[] = {3, 7, 0xFFFFFFFFu};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t sent = 12345;
        /* slot 0 is this worker: a kind read as WORKER would deliver here. */
        EXPECT(shmc_emit(w, bad[i], 0, "note", (const uint8_t *)"x", 1, &sent), SHMC_RESULT_INVALID_ARGUMENT);
        CHECK(sent == 12345); /* out-pointers are written only on success */
        char text[256];
        shmc_last_error_message((uint8_t *)text, sizeof text, NULL);
        CHECK(strstr(text, "target") != NULL);
    }
    size_t handled = 0;
    OK(shmc_poll(w, 100, &handled));
    CHECK(handled == 0);
    CHECK(received == 0);

    /* The valid kinds still go where they say. */
    size_t sent = 0;
    OK(shmc_emit(w, SHMC_TARGET_KIND_WORKER, 0, "note", NULL, 0, &sent));
    CHECK(sent == 1);
    OK(shmc_poll(w, 1000, &handled));
    CHECK(received == 1);

    OK(shmc_worker_free(w));
    shmc_segment_free(seg);
    return 0;
}
