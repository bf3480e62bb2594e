/* Prints a line, tells the boot timer it reached "init", and resets: the boot benchmark's
 * guest and the smallest end-to-end test of the VMM. */
#include "common.S"

main:
    PRINT "cvm micro-guest: hello from the guest\n"
    movb $123, BOOT_TIMER
    ret
