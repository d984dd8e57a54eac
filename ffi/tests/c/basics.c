/* ABI version, NULL arguments, error texts, attaching to a wrong fd. */
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include "check.h"

int main(void) {
    /* The header and the library agree; a different version is refused. */
    CHECK(shmc_abi_version() == SHMC_ABI_VERSION);
    OK(shmc_check_abi_version(SHMC_ABI_VERSION));
    EXPECT(shmc_check_abi_version(SHMC_ABI_VERSION + 1), SHMC_RESULT_ABI_VERSION_MISMATCH);

    /* Error texts: known, unknown, truncated. */
    char text[256];
    size_t len = 0;
    OK(shmc_error_string(SHMC_RESULT_NOT_A_SEGMENT, (uint8_t *)text, sizeof text, &len));
    CHECK(strcmp(text, "not a shmcluster segment") == 0 && len == strlen(text));
    OK(shmc_error_string(123456, (uint8_t *)text, sizeof text, NULL));
    CHECK(strstr(text, "unknown") != NULL);
    EXPECT(shmc_error_string(SHMC_RESULT_NOT_A_SEGMENT, (uint8_t *)text, 4, &len), SHMC_RESULT_BUFFER_TOO_SMALL);
    CHECK(strcmp(text, "not") == 0 && len == strlen("not a shmcluster segment"));

    /* NULL arguments are error codes, never crashes. */
    shmc_worker *w = NULL;
    shmc_segment *seg = NULL;
    EXPECT(shmc_segment_create(2, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_worker_attach(NULL, 0, &w), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_ready(NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_emit(NULL, SHMC_TARGET_KIND_ALL, 0, "e", NULL, 0, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_request_shutdown(NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_unlock(NULL), SHMC_RESULT_OK); /* free-like: NULL ignored */
    EXPECT(shmc_worker_free(NULL), SHMC_RESULT_OK);
    CHECK(shmc_should_stop(NULL));
    shmc_bytes_free(NULL);
    shmc_map_result_free(NULL);
    shmc_segment_free(NULL);
    EXPECT(shmc_segment_create(0, &seg), SHMC_RESULT_INVALID_CONFIG);

    OK(shmc_segment_create(2, &seg));
    CHECK(shmc_segment_workers(seg) == 2);
    OK(shmc_worker_attach(seg, 0, &w));
    EXPECT(shmc_emit(w, SHMC_TARGET_KIND_ALL, 0, NULL, NULL, 0, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_emit(w, SHMC_TARGET_KIND_WORKER, 0, "e", NULL, 5, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_emit(w, SHMC_TARGET_KIND_WORKER, 7, "e", NULL, 0, NULL), SHMC_RESULT_NO_SUCH_WORKER);
    EXPECT(shmc_on(w, "e", NULL, NULL, NULL), SHMC_RESULT_NULL_ARGUMENT);
    EXPECT(shmc_emit(w, SHMC_TARGET_KIND_ALL, 0, "\xff\xfe", NULL, 0, NULL), SHMC_RESULT_INVALID_ARGUMENT);
    char longname[300];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    EXPECT(shmc_emit(w, SHMC_TARGET_KIND_ALL, 0, longname, NULL, 0, NULL), SHMC_RESULT_EVENT_NAME);

    /* The slot is taken: a second worker on it is refused. */
    shmc_worker *again = NULL;
    EXPECT(shmc_worker_attach(seg, 0, &again), SHMC_RESULT_SLOT_BUSY);
    EXPECT(shmc_worker_attach(seg, 9, &again), SHMC_RESULT_NO_SUCH_WORKER);
    CHECK(again == NULL);

    /* Attaching through the segment's fd works (slot 1); the caller keeps its fd. */
    shmc_worker *by_fd = NULL;
    OK(shmc_worker_attach_fd(shmc_segment_fd(seg), 1, &by_fd));
    shmc_identity id;
    OK(shmc_identity_get(by_fd, &id));
    CHECK(id.slot == 1 && id.slots == 2 && !id.has_master);
    OK(shmc_worker_free(by_fd));

    /* A plain file is "not a segment"; a closed fd is an I/O error. */
    char path[] = "/tmp/shmc-basics-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    CHECK(write(fd, "hello, not a segment, just some bytes in a plain file", 53) == 53);
    EXPECT(shmc_worker_attach_fd(fd, 0, &again), SHMC_RESULT_NOT_A_SEGMENT);
    shmc_last_error_message((uint8_t *)text, sizeof text, NULL);
    CHECK(strstr(text, "not a segment") != NULL);
    close(fd);
    EXPECT(shmc_worker_attach_fd(fd, 0, &again), SHMC_RESULT_IO);
    EXPECT(shmc_worker_attach_fd(-1, 0, &again), SHMC_RESULT_INVALID_ARGUMENT);
    CHECK(again == NULL);

    /* Without a master: ready is a no-op, reload has no one to ask. */
    OK(shmc_ready(w));
    EXPECT(shmc_request_reload(w), SHMC_RESULT_NO_MASTER);
    CHECK(!shmc_should_stop(w));
    OK(shmc_request_shutdown(w));
    CHECK(shmc_should_stop(w));
    OK(shmc_run(w)); /* returns at once: stop was asked for */

    /* Stats: one row per slot, and a text table. */
    shmc_stats *stats = NULL;
    OK(shmc_stats_get(w, &stats));
    CHECK(shmc_stats_slot_count(stats) == 2);
    shmc_slot_stats row;
    OK(shmc_stats_slot(stats, 0, &row));
    CHECK(row.slot == 0);
    EXPECT(shmc_stats_slot(stats, 2, &row), SHMC_RESULT_INVALID_ARGUMENT);
    size_t need = 0;
    EXPECT(shmc_stats_format(stats, NULL, 0, &need), SHMC_RESULT_BUFFER_TOO_SMALL);
    char *table = malloc(need + 1);
    OK(shmc_stats_format(stats, table, need + 1, NULL));
    CHECK(strstr(table, "slot") != NULL);
    free(table);
    shmc_stats_free(stats);

    OK(shmc_worker_free(w));
    shmc_segment_free(seg);
    printf("basics: ok\n");
    return 0;
}
