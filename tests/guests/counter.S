/* Prints a line, tells the boot timer it reached "init", then counts: the ten digits of a
 * counter kept in memory, a pause after each, and a reset. The snapshot tests snapshot it at
 * the boot timer: a VM restored from that snapshot prints the digits and resets, and never
 * the line before them. */
#include "common.S"

main:
    PRINT "counter: booted\n"
    movl $'0', counter
    movb $123, BOOT_TIMER
1:  movl counter, %eax
    movw $SERIAL, %dx
    outb %al, %dx
    movl $20000, %ecx
2:  decl %ecx
    jnz 2b
    incl counter
    cmpl $('9' + 1), counter
    jne 1b
    PRINT "\n"
    ret

    /* In the image's one flat region, where nothing is read-only. */
    .section .rodata
    .balign 4
counter: .long 0
