/* Loads an empty IDT and raises an exception: no handler, no double-fault handler, so the
 * CPU shuts down (a triple fault). */
#include "common.S"

main:
    PRINT "about to triple fault\n"
    lidt empty_idt
    ud2
    PRINT "still alive?\n"
    ret

    .section .rodata
empty_idt:
    .word 0
    .long 0
