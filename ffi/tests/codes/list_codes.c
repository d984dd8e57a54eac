/* Prints every shmc_result the loaded library knows, one a line:
 * number, C name and text separated by tabs (tests/python_codes.rs makes
 * python/shmcluster/_codes.py from it). */
#include <stdio.h>
#include <stdlib.h>
#include "shmcluster.h"

int main(void) {
    size_t count = 0;
    if (shmc_result_codes(NULL, 0, &count) != SHMC_RESULT_BUFFER_TOO_SMALL || count == 0) return 1;
    uint32_t *codes = calloc(count, sizeof *codes);
    if (!codes || shmc_result_codes(codes, count, &count) != SHMC_RESULT_OK) return 1;
    for (size_t i = 0; i < count; i++) {
        char name[128], text[512];
        if (shmc_result_name(codes[i], (uint8_t *)name, sizeof name, NULL) != SHMC_RESULT_OK) return 1;
        if (shmc_error_string(codes[i], (uint8_t *)text, sizeof text, NULL) != SHMC_RESULT_OK) return 1;
        printf("%u\t%s\t%s\n", (unsigned)codes[i], name, text);
    }
    /* The names are the header's: spot-check a few against its constants. */
    if (SHMC_RESULT_NO_HANDLER != 201 || SHMC_RESULT_ABI_VERSION_MISMATCH != 9 || SHMC_RESULT_IO != 104) return 1;
    free(codes);
    return 0;
}
