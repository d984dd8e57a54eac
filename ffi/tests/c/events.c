/* The master's events as a worker reads them (shmc_events_*), their text
 * and names, and shmc_on_leader_change, on a segment without a master:
 * no event ever comes, a reader outlives its worker and segment, a struct
 * with numbers no kind or reason has is refused, and a lone campaigning
 * worker is told once that it leads. */
#include <string.h>
#include "check.h"

static int changes;
static shmc_leader_change last;

static void on_change(void *userdata, const shmc_leader_change *c) {
    CHECK(userdata == &changes);
    changes++;
    last = *c;
}

int main(void) {
    shmc_segment *seg = NULL;
    OK(shmc_segment_create(1, &seg));
    shmc_worker *w = NULL;
    OK(shmc_worker_attach(seg, 0, &w));

    shmc_events *events = NULL;
    EXPECT(shmc_events_new(w, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_events_new(NULL, &events), SHMC_RESULT_NULL_ARGUMENT);
    OK(shmc_events_new(w, &events));
    shmc_event e;
    memset(&e, 0xAB, sizeof e);
    EXPECT(shmc_events_next(events, 0, &e), SHMC_RESULT_TIMED_OUT);
    EXPECT(shmc_events_next(events, 50, &e), SHMC_RESULT_TIMED_OUT);
    CHECK(e.seq == 0xABABABABABABABABull); /* untouched without an event */
    EXPECT(shmc_events_next(events, 0, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_events_next(NULL, 0, &e), SHMC_RESULT_NULL_ARGUMENT);
    uint64_t missed = 99;
    OK(shmc_events_missed(events, &missed));
    CHECK(missed == 0);

    /* The leader change: a lone candidate is told it leads, once. */
    EXPECT(shmc_on_leader_change(w, NULL, NULL), SHMC_RESULT_NULL_ARGUMENT);
    OK(shmc_on_leader_change(w, on_change, &changes));
    OK(shmc_campaign(w, NULL));
    for (int i = 0; i < 200 && changes == 0; i++) {
        size_t handled = 0;
        OK(shmc_poll(w, 10, &handled));
    }
    CHECK(changes == 1);
    CHECK(last.slot == 0 && last.is_me && last.term >= 1);
    for (int i = 0; i < 5; i++) {
        size_t handled = 0;
        OK(shmc_poll(w, 10, &handled));
    }
    CHECK(changes == 1);

    /* The reader reads the segment only: it outlives worker and segment. */
    OK(shmc_worker_free(w));
    shmc_segment_free(seg);
    EXPECT(shmc_events_next(events, 10, &e), SHMC_RESULT_TIMED_OUT);
    shmc_events_free(events);
    shmc_events_free(NULL);

    /* Text and names. */
    shmc_event exit_event = {
        .seq = 4, .kind = SHMC_EVENT_KIND_EXIT, .reason = SHMC_EXIT_REASON_EXITED, .value = 3,
        .slot = 1, .index = 1, .pid = 4242, .generation = 2,
    };
    char text[128];
    size_t len = 0;
    OK(shmc_event_format(&exit_event, text, sizeof text, &len));
    CHECK(strcmp(text, "worker 1 ended: exited with code 3 (slot 1, pid 4242, generation 2)") == 0);
    CHECK(len == strlen(text));
    shmc_event reload = {.kind = SHMC_EVENT_KIND_RELOAD_FINISHED, .value = 1, .slot = UINT32_MAX, .index = UINT32_MAX};
    OK(shmc_event_format(&reload, text, sizeof text, NULL));
    CHECK(strcmp(text, "reload finished: ok") == 0);
    /* The binary upgrade: the new master's pid in value, negated on failure. */
    shmc_event upgrade = {.kind = SHMC_EVENT_KIND_UPGRADE_STARTED, .value = 4321, .slot = UINT32_MAX, .index = UINT32_MAX};
    OK(shmc_event_format(&upgrade, text, sizeof text, NULL));
    CHECK(strcmp(text, "upgrade started: new master pid 4321") == 0);
    upgrade.kind = SHMC_EVENT_KIND_UPGRADE_FINISHED;
    OK(shmc_event_format(&upgrade, text, sizeof text, NULL));
    CHECK(strcmp(text, "upgrade finished: ok, new master pid 4321 took over; draining") == 0);
    upgrade.value = -4321;
    OK(shmc_event_format(&upgrade, text, sizeof text, NULL));
    CHECK(strcmp(text, "upgrade failed: new master pid 4321 did not take over") == 0);
    /* Numbers no kind or reason has (a C caller may store any). */
    shmc_event bad = exit_event;
    *(uint32_t *)&bad.kind = 99;
    EXPECT(shmc_event_format(&bad, text, sizeof text, NULL), SHMC_RESULT_INVALID_ARGUMENT);
    bad = exit_event;
    *(uint32_t *)&bad.reason = 0;
    EXPECT(shmc_event_format(&bad, text, sizeof text, NULL), SHMC_RESULT_INVALID_ARGUMENT);
    EXPECT(shmc_event_format(NULL, text, sizeof text, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_event_format(&exit_event, text, 8, &len), SHMC_RESULT_BUFFER_TOO_SMALL);
    CHECK(strlen(text) == 7 && len > 7);

    OK(shmc_event_kind_name(SHMC_EVENT_KIND_CRASH_LOOP, text, sizeof text, NULL));
    CHECK(strcmp(text, "CRASH_LOOP") == 0);
    OK(shmc_event_kind_name(SHMC_EVENT_KIND_START_FAILED, text, sizeof text, NULL));
    CHECK(strcmp(text, "START_FAILED") == 0);
    /* Appended, never renumbered: the upgrade kinds follow START_FAILED. */
    CHECK(SHMC_EVENT_KIND_START_FAILED == 9);
    CHECK(SHMC_EVENT_KIND_UPGRADE_STARTED == 10 && SHMC_EVENT_KIND_UPGRADE_FINISHED == 11);
    OK(shmc_event_kind_name(SHMC_EVENT_KIND_UPGRADE_STARTED, text, sizeof text, NULL));
    CHECK(strcmp(text, "UPGRADE_STARTED") == 0);
    OK(shmc_event_kind_name(SHMC_EVENT_KIND_UPGRADE_FINISHED, text, sizeof text, NULL));
    CHECK(strcmp(text, "UPGRADE_FINISHED") == 0);
    EXPECT(shmc_event_kind_name(12, text, sizeof text, NULL), SHMC_RESULT_INVALID_ARGUMENT);
    OK(shmc_exit_reason_name(SHMC_EXIT_REASON_LOCK_HELD, text, sizeof text, NULL));
    CHECK(strcmp(text, "LOCK_HELD") == 0);
    EXPECT(shmc_exit_reason_name(8, text, sizeof text, NULL), SHMC_RESULT_INVALID_ARGUMENT);
    return 0;
}
